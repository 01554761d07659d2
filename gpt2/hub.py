"""Files from the Hugging Face Hub, through `huggingface_hub`, so that a download behaves as in any HF library:

- one shared cache (~/.cache/huggingface/hub, or $HF_HOME / $HF_HUB_CACHE), resumable downloads, a progress bar;
- private and gated repositories with $HF_TOKEN (or `hf auth login`); a mirror with $HF_ENDPOINT;
- $HF_HUB_OFFLINE=1: the cache alone, no network.

Every failure becomes one UserError that says what to do.
"""
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from .errors import UserError

REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "gpt2", "openai-community/gpt2", "user/my-adapter"


def is_repo_id(name: str) -> bool:
    return REPO_ID.fullmatch(name) is not None and not name.startswith(".") and ".." not in name


def hub_file(repo_id: str, filename: str, needed: Sequence[str]) -> Path:
    """The local path of `filename` from the Hub repository `repo_id`: from the cache, else downloaded into it.
    `needed` lists every file the caller will fetch from this repository, for the offline advice."""
    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError:  # offline (or the Hub unreachable) and not cached
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
               "the Hub cannot be reached (HF_HUB_OFFLINE=1 skips the connection attempts)")
        raise UserError(
            f"{filename} of {repo_id} is not in the Hugging Face cache and {why}. On a machine with network run "
            f"`hf download {repo_id} {' '.join(needed)} --local-dir DIR` (or download them from "
            f"{constants.ENDPOINT}/{repo_id}/tree/main), copy DIR here and pass DIR instead of {repo_id!r}") from None
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its terms on {constants.ENDPOINT}/{repo_id} and set HF_TOKEN "
                        f"to a token of that account") from None
    except RepositoryNotFoundError:
        raise UserError(f"no Hub repository {repo_id!r} (nor a local path of that name); if it is private, set "
                        f"HF_TOKEN") from None
    except RevisionNotFoundError as e:
        raise UserError(f"{repo_id}: {e}") from None
    except EntryNotFoundError:
        raise UserError(f"the Hub repository {repo_id} has no {filename}") from None
    except (HfHubHTTPError, OSError) as e:  # a server error, a full disk, a broken connection mid-download
        raise UserError(f"could not download {filename} of {repo_id} ({type(e).__name__}: {e}); try again, or "
                        f"set HF_HUB_OFFLINE=1 to use the cache only") from None
