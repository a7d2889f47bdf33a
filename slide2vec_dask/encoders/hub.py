"""Where a preset's weights come from: a file of its Hugging Face repo.

`fetch_hub_file` resolves one weight file through ``huggingface_hub``: from
the local cache when it is there, downloading it otherwise.  The
environment is read at call time, not when ``huggingface_hub`` was
imported, so a worker (or a test) that sets them late is honoured:

* ``HF_HUB_CACHE`` / ``HF_HOME`` - the cache (``$HF_HOME/hub``);
* ``HF_HUB_OFFLINE=1`` - never touch the network, only the cache;
* ``HF_TOKEN`` - the token for gated repos (else ``hf auth login``'s).

Every failure becomes a `WeightsUnavailableError` that names the preset,
the repo and what to do about it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

_TRUE = {"1", "on", "yes", "true"}


class WeightsUnavailableError(OSError):
    """A preset's weights cannot be had: gated, not cached while offline, or absent."""


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub would use if it were imported now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.path.expandvars(os.environ[var]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as the environment says now.

    Not huggingface_hub's constant: that is frozen when the package is first
    imported, and a worker may well have imported it under another setting.
    """
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_token() -> str | None:
    """``HF_TOKEN``, else the token ``hf auth login`` saved under the current ``HF_HOME``."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("HF_TOKEN_PATH") or (
        os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "token")
        if os.environ.get("HF_HOME") else None)
    if path and os.path.isfile(path):
        return Path(path).read_text().strip() or None
    return None  # huggingface_hub falls back to its own lookup


def _url(repo_id: str, repo_type: str = "model") -> str:
    return f"https://huggingface.co/{'' if repo_type == 'model' else 'datasets/'}{repo_id}"


def _advice(preset: str, repo_id: str, gated: bool, filename: str, repo_type: str = "model") -> str:
    url = _url(repo_id, repo_type)
    steps = [f"accept the licence at {url} with your Hugging Face account and log in on this machine "
             "(`hf auth login`, or set HF_TOKEN)"] if gated else []
    steps.append(f"download {filename} from {url} yourself and pass it: "
                 f"Model.from_preset({preset!r}, checkpoint_path='/path/to/{filename}')")
    return "to fix it, " + "; or ".join(steps)


def fetch_hub_file(preset: str, repo_id: str, filenames: Sequence[str], *, gated: bool = False,
                   revision: str | None = None, repo_type: str = "model") -> Path:
    """Local path of the first of ``filenames`` that ``repo_id`` has (cache first)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cache_dir = hub_cache_dir()
    offline = hub_offline()
    token = hub_token()
    not_cached: list[str] = []
    absent: list[str] = []
    for filename in filenames:
        try:
            path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                   local_files_only=offline, token=token,
                                   **({} if repo_type == "model" else {"repo_type": repo_type}))
            return Path(path)
        except GatedRepoError as exc:
            raise WeightsUnavailableError(
                f"preset {preset!r}: {_url(repo_id, repo_type)} is gated and this machine's "
                f"Hugging Face token has no access to it ({type(exc).__name__}); "
                + _advice(preset, repo_id, True, filename, repo_type)) from exc
        except RepositoryNotFoundError as exc:
            raise WeightsUnavailableError(
                f"preset {preset!r}: the Hugging Face repo {repo_id} was not found, or needs a token "
                f"that can read it ({type(exc).__name__}); "
                + _advice(preset, repo_id, gated, filename, repo_type)) from exc
        except LocalEntryNotFoundError:
            not_cached.append(filename)      # not in the cache, and the hub not asked or not reachable
        except EntryNotFoundError:
            absent.append(filename)          # the repo has no such file: try the next name
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise WeightsUnavailableError(
                    f"preset {preset!r}: access to {_url(repo_id, repo_type)} was refused "
                    f"(HTTP {status}); " + _advice(preset, repo_id, True, filename, repo_type)) from exc
            raise WeightsUnavailableError(
                f"preset {preset!r}: downloading {filename} from {repo_id} failed ({exc}); "
                + _advice(preset, repo_id, gated, filename, repo_type)) from exc

    if not_cached:
        why = ("downloads are off (HF_HUB_OFFLINE=1)" if offline
               else "the Hugging Face hub could not be reached")
        raise WeightsUnavailableError(
            f"preset {preset!r}: {' / '.join(not_cached)} of {_url(repo_id, repo_type)} is not in the "
            f"Hugging Face cache ({cache_dir}) and {why}. Fill the cache on a connected machine with "
            f"`hf download {repo_id} {not_cached[0]}"
            + ("" if repo_type == "model" else f" --repo-type {repo_type}") + "` (same HF_HOME); "
            + _advice(preset, repo_id, gated, not_cached[0], repo_type))
    raise WeightsUnavailableError(
        f"preset {preset!r}: the Hugging Face repo {repo_id} has none of the weight files {list(absent)}; "
        + _advice(preset, repo_id, gated, filenames[0], repo_type))
