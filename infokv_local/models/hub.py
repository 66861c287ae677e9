"""Model files from the Hugging Face Hub through huggingface-hub, working offline from its cache."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from ..errors import ModelFileError


def _cached_repo_files(repo_id: str, cache_dir: str | None) -> list[str]:
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir)
    except Exception:  # no cache directory yet
        return []
    files: set[str] = set()
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            for rev in repo.revisions:
                files |= {str(f.file_path.relative_to(rev.snapshot_path)) for f in rev.files}
    return sorted(files)


def hf_model_file(repo_id: str, filename: str, cache_dir: str | None = None) -> Path:
    """Download (or find in the local cache) one GGUF file of a Hub repository.

    ``filename`` may be a glob (``*Q4_K_M.gguf``), matched against the repository's files (the
    cached ones when the Hub cannot be reached). Offline, a cached file is used; a file that is
    neither reachable nor cached raises :class:`ModelFileError` saying so.
    """
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    name = filename
    if any(c in filename for c in "*?["):
        try:
            candidates = list_repo_files(repo_id)
        except Exception:
            candidates = _cached_repo_files(repo_id, cache_dir)
        matches = sorted(f for f in candidates if fnmatch.fnmatch(f, filename))
        if not matches:
            raise ModelFileError(f"no file of {repo_id} matches {filename!r} (known files: {candidates[:20]})")
        if len(matches) > 1:
            raise ModelFileError(f"{filename!r} matches several files of {repo_id}: {matches}; give one")
        name = matches[0]
    try:
        return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir))
    except LocalEntryNotFoundError as e:
        raise ModelFileError(
            f"{repo_id}/{name} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline?): download it once while online, or give a local GGUF path ({e.__class__.__name__})"
        ) from e
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise ModelFileError(f"{repo_id}/{name} does not exist on the Hub: {e}") from e
