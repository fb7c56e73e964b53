"""After training: save, card and publish (`save`, `hub`, `card`), merge, generate, and the GGUF export (`export`,
`export_check`, `export_card`, `export_lora`, `llama_cpp`)."""
