"""The config.json of a hub repo id, fetched the way SGLang 0.5.23 fetches it moments later.

`sglang serve --model-path stepfun-ai/Step-3.5-Flash` names a repo, not a directory. The launch
policy (`launch.apply_server_policy`) runs before SGLang's own argument resolution, which then reads
the config itself: `ModelConfig` -> `get_config` -> `AutoConfig.from_pretrained(model, revision=...)`
(transformers' `PretrainedConfig.get_config_dict`), or, with `SGLANG_USE_MODELSCOPE`, the ModelScope
snapshot that `arg_groups/model_path_hook.handle_modelscope_paths` finds in its cache or downloads.
To decide on the same checkpoint, we read it through the same functions with the same inputs
(`--revision`, `--download-dir` for ModelScope; HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN and the cache
are the libraries' own rules, since it is their code that runs). Only config.json is fetched: the
weights stay SGLang's to download, after the policy has accepted the launch. The one check that
reads more than the config, whether the checkpoint really holds the MTP layers it declares, is
therefore made for a repo id when the weights load (`Step3p5MTP.load_weights` raises the same
`Step35MTPError` the launcher raises for a directory).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

logger = logging.getLogger("sglang_step35")


def is_repo_id(source: str) -> bool:
    """A Hub-style repo id (`owner/name` or `name`), as huggingface_hub validates one. Other model
    paths SGLang accepts (GGUF references `owner/repo:QUANT`, `owner/repo/file.gguf`, remote URLs)
    are not read through config.json, so we leave them to SGLang."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def use_modelscope() -> bool:
    from sglang.srt.environ import envs

    return bool(envs.SGLANG_USE_MODELSCOPE.get())


def launch_config(model_path, revision: Optional[str] = None, download_dir: Optional[str] = None) -> Optional[dict]:
    """The config the launch policy decides on, as a dict, or None for a model that is not read
    through a config.json (then it is not a Step checkpoint and the policy leaves it alone).
    A path on disk is read directly; a repo id is fetched (:func:`fetch_config`); a failed fetch
    raises :class:`ConfigUnread` (logged first)."""
    from sglang_step35.config import read_config

    source = str(model_path)
    if os.path.exists(source) or not is_repo_id(source):
        return read_config(source, missing_ok=True)
    try:
        return fetch_config(source, revision, download_dir)
    except Exception as e:  # noqa: BLE001 - any failure of the fetch is reported, then left to SGLang
        # SGLang's loader runs the same fetch moments later and raises this same error if the config
        # is really needed; model paths it serves without one must not be refused by us. But its fetch
        # may succeed where ours failed (a transient error), so the launch policy records the failure
        # (launch/marker.py) and a Step-3.5 model built in this launch refuses to start.
        reason = f"{type(e).__name__}: {e}"
        logger.warning("could not read config.json of %s (revision %s): %s; the Step-3.5 launch policy "
                       "is not applied to it, and a Step-3.5 model will refuse to start", source,
                       revision or "default", reason)
        raise ConfigUnread(reason) from e


class ConfigUnread(RuntimeError):
    """The config.json of a repo id could not be fetched (offline, no network, no access); the
    message is the cause."""


def fetch_config(repo_id: str, revision: Optional[str] = None, download_dir: Optional[str] = None) -> Optional[dict]:
    """config.json of `repo_id` at `revision` as a dict; None when the repo has no config.json (not a
    transformers-style checkpoint, so not a Step one). Errors (offline with nothing cached, unknown
    repo, no access) propagate: they are the ones SGLang's own loader would raise."""
    if use_modelscope():
        return _modelscope_config(repo_id, revision, download_dir)
    from transformers import PretrainedConfig

    # What AutoConfig.from_pretrained runs inside SGLang's get_config: resolve the revision once, then
    # cached_file("config.json") through huggingface_hub (cache first; offline mode honoured).
    # It returns {} when the repo has no config.json.
    config, _ = PretrainedConfig.get_config_dict(repo_id, revision=revision, _from_auto=True)
    return config or None


def _modelscope_config(repo_id: str, revision: Optional[str], download_dir: Optional[str]) -> Optional[dict]:
    # SGLang's handle_modelscope_paths is a closure that downloads the whole snapshot; we follow its
    # order (ModelScope cache root, then --download-dir, then the hub) for config.json alone.
    import json

    from modelscope.utils.file_utils import get_model_cache_root

    for root in (get_model_cache_root(), download_dir):
        local = os.path.join(root, repo_id) if root else None
        if local and os.path.exists(local):
            path = os.path.join(local, "config.json")
            return json.loads(open(path).read()) if os.path.isfile(path) else None
    from modelscope.hub.file_download import model_file_download

    path = model_file_download(repo_id, "config.json", revision=revision, cache_dir=download_dir)
    with open(path) as f:
        return json.load(f)
