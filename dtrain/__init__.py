"""Runs inside each rank (and in the launcher's in-process commands: check, eval, export)."""

from dtrain import no_hub_kernels

# Before anything imports bitsandbytes (peft does, whenever it is installed): its import must not call the Hub.
no_hub_kernels.install()
