"""Files written whole and tensors in the safetensors format: the one copy that gpt2/ and lora/ share.

It imports torch and the standard library only, like lora/, so that both packages can use it. Its errors are
FileError: a file the user must fix (a full disk, a missing permission, a corrupt download), named with its cause.
"""
from .files import FileError, atomic_write, check_writable_dir
from .safetensors import load_safetensors, save_safetensors

__all__ = ["FileError", "atomic_write", "check_writable_dir", "load_safetensors", "save_safetensors"]
