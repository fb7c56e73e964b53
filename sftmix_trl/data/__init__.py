"""The data of a run: read and normalised (`load`), what cannot train counted (`drops`), prepared once and checked
before any write (`checks`, `prepare`)."""

from sftmix_trl.data.drops import DropLog
from sftmix_trl.data.load import EXAMPLE_ID, has_multi_turn, load_datasets
from sftmix_trl.data.prepare import prepare_run_data

__all__ = ["EXAMPLE_ID", "DropLog", "has_multi_turn", "load_datasets", "prepare_run_data"]
