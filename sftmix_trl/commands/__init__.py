"""The recipes' mains. `recipes/*.py` in a clone and the `sftmix-trl` command (`sftmix_trl.cli`) both run these."""
