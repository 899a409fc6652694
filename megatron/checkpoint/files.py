"""A checkpoint folder: its metadata file, the tracker, finding the latest, checking it against the
flags, publishing a save atomically, and one-process reads and writes of its stored tensors.

Layout on disk (Megatron's names):
    SAVE/latest_checkpointed_iteration.txt      the iteration of the newest complete checkpoint
    SAVE/iter_0000100/                          one checkpoint:
        .metadata, __<rank>_0.distcp            DCP: every stored tensor (megatron.model.params,
                                                "stored tensors") as the one-process full tensor
        ted_checkpoint.json                     iteration, consumed samples, scheduler, loss scaler,
                                                optimizer step, the configs, the layout it was
                                                saved at
        rng/rank_00003.pt                       each rank's RNG states (tensors only)

Atomic: a save writes `iter_N.tmp/`; once every rank has finished, rank 0 renames it to `iter_N/`,
fsyncs the folder, then replaces the tracker file with os.replace. A kill at any point leaves the
previous checkpoint, and the tracker naming it, intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.checkpoint.guards import LOCK
from megatron.checkpoint.storage import (CheckpointError, Parts, SafeReader, dcp_load, dcp_save,
                                         verify_chunks)
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

TRACKER = "latest_checkpointed_iteration.txt"
META = "ted_checkpoint.json"
FORMAT = "megatron-ted/1"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


# ---- the metadata file ---------------------------------------------------------------------------
def config_dict(cfg) -> dict:
    """A frozen config dataclass as JSON-able data (dtypes by name)."""
    out = dataclasses.asdict(cfg)
    return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
            for k, v in out.items()}


def configs_from_meta(meta: dict) -> tuple[ModelConfig, Optional[MoEConfig]]:
    model = dict(meta["model"])
    model["params_dtype"] = getattr(torch, model["params_dtype"])
    moe = meta.get("moe")
    if moe is not None:
        per_layer = moe.get("experts_per_layer")
        moe = MoEConfig(**{**moe, "layers": tuple(moe["layers"]),
                           "experts_per_layer": None if per_layer is None else tuple(per_layer)})
    return ModelConfig(**model), moe


# Fields whose change changes the stored tensors' shapes or meaning: resuming across one is an
# error.
SHAPE_FIELDS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size",
              "max_position_embeddings", "position_embedding_type", "normalization", "swiglu",
              "add_bias_linear", "untie_embeddings_and_output_weights", "num_query_groups",
              "kv_channels", "qk_layernorm", "multi_latent_attention", "q_lora_rank",
              "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"),
    "moe": ("num_experts", "experts_per_layer", "layers", "mlp_type", "expert_ffn_hidden_size",
            "shared_expert_intermediate_size", "shared_expert_gate"),
}
# fields added after checkpoints without them were written: their value when absent
SHAPE_DEFAULTS = {"shared_expert_intermediate_size": None, "shared_expert_gate": False,
                  "kv_channels": None, "qk_layernorm": False, "multi_latent_attention": False,
                  "q_lora_rank": None, "kv_lora_rank": 32, "qk_head_dim": 128,
                  "qk_pos_emb_head_dim": 64, "v_head_dim": 128}


def check_compatible(meta: dict, model: ModelConfig, moe: Optional[MoEConfig], where: str) -> None:
    """Raise a CheckpointError naming the first model-shape field that differs from the
    checkpoint."""
    if (meta.get("moe") is None) != (moe is None):
        saved = "a dense GPT" if meta.get("moe") is None else "a GPT-MoE"
        raise CheckpointError(f"{where} holds {saved}; the flags build "
                              f"{'a GPT-MoE' if moe else 'a dense GPT'} (check --num-experts)")
    current = {"model": config_dict(model), "moe": config_dict(moe) if moe else None}
    for section, fields in SHAPE_FIELDS.items():
        if current[section] is None:
            continue
        for field in fields:
            saved = meta[section].get(field, SHAPE_DEFAULTS.get(field))
            now = current[section][field]
            if isinstance(now, tuple):
                now = list(now)
            if saved != now:
                raise CheckpointError(f"{where} was saved with {section} {field} = {saved}, the "
                                      f"flags give {now}: the model's shape differs (use the "
                                      "checkpoint's value)")


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- finding and checking a checkpoint -----------------------------------------------------------
def find_checkpoint(path: str) -> Optional[str]:
    """The iteration folder to load from `path` (a --save folder, or one iter_N folder itself);
    None when `path` does not exist or holds no checkpoint (nothing, or only unfinished .tmp saves).
    Raises CheckpointError when it holds files but no valid checkpoint, or a peer's checkpoint
    (naming its format and the conversion command)."""
    peer = peer_checkpoint(path)
    if peer is not None:
        raise CheckpointError(peer)
    if os.path.isfile(os.path.join(path, META)) or os.path.isfile(os.path.join(path, ".metadata")):
        return path
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise CheckpointError(f"--load {path} is a file; give the --save directory of a run")
        return None
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        text = _read_tracker(tracker)
        if not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text[:40]!r}, not an iteration number: the "
                                  "file is corrupt")
        found = iteration_dir(path, int(text))
        if not os.path.isdir(found):
            raise CheckpointError(f"{tracker} names iteration {text}, but {found} does not exist")
        return found
    entries = os.listdir(path)
    # a save that finished but was killed before the tracker was written: renamed, so whole
    # (an iter_N.tmp folder may hold its metadata file before every rank has written)
    complete = sorted(e for e in entries if e.startswith("iter_") and e[5:].isdigit()
                      and os.path.isfile(os.path.join(path, e, META)))
    if complete:
        return os.path.join(path, complete[-1])
    if all(e.endswith((".tmp", ".old")) or e == LOCK for e in entries):
        return None  # nothing, or only saves killed before they committed: start from scratch
    raise CheckpointError(f"{path} holds files but no checkpoint (no {TRACKER}, no iter_* folder): "
                          "give the --save directory of a run (pretrain_gpt_moe.py --load of an "
                          "empty or new directory starts from scratch)")


# ---- the peers' checkpoint folders: what they are and how to convert them ----------------------
_PEERS = {"megatron-legacy": "a Megatron-LM legacy torch checkpoint (--ckpt-format torch: "
                             "iter_N/mp_rank_*/model_optim_rng.pt)",
          "mcore": "a Megatron-Core torch_dist checkpoint (dist_checkpointing: iter_N/.metadata, "
                   "common.pt)",
          "megatron-deepspeed": "a DeepSpeed / Megatron-DeepSpeed checkpoint (latest, "
                                "global_stepN/mp_rank_*_model_states.pt)"}


def peer_checkpoint(path: str) -> Optional[str]:
    """One line naming the peer format of the checkpoint at `path` (a --save folder or one
    iteration folder) and the command that converts it; None when it is not a peer's."""
    fmt = _peer_format(path)
    if fmt is None:
        return None
    return (f"--load {path} holds {_PEERS[fmt]}, not one of ours: convert it with `python "
            f"tools/checkpoint_convert.py import --from {fmt} {path} DST`, then --load DST")


def _peer_format(path: str) -> Optional[str]:
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, META)):
        return None
    folders = [path]
    for tracker, name in ((TRACKER, lambda t: "release" if t == "release" else
                           f"iter_{int(t):07d}" if t.isdigit() else None),
                          ("latest", lambda t: t or None)):  # DeepSpeed's tag file
        try:
            with open(os.path.join(path, tracker), "rb") as f:
                folder = name(f.read(256).decode("utf-8").strip())
        except (OSError, UnicodeDecodeError):
            continue
        if folder and "/" not in folder:
            folders.append(os.path.join(path, folder))
    for folder in folders:
        if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, META)):
            continue
        entries = os.listdir(folder)
        if "mp_rank_00_model_states.pt" in entries:
            return "megatron-deepspeed"
        if ".metadata" in entries and ("common.pt" in entries or "metadata.json" in entries):
            return "mcore"
        if any(e.startswith("mp_rank_") and os.path.isfile(os.path.join(folder, e,
                                                                        "model_optim_rng.pt"))
               for e in entries):
            return "megatron-legacy"
    return None


def _read_tracker(tracker: str) -> str:
    try:
        with open(tracker, "rb") as f:
            return f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{tracker} is unreadable ({e}): the file is corrupt; write the "
                              "iteration to load into it, or delete it to load the newest "
                              "iter_* folder") from None


def read_checkpoint_meta(path: str) -> dict:
    """The metadata of the checkpoint at `path` (a --save folder's latest, or an iter_N folder),
    after checking every file it names is there and whole."""
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint there")
    meta_path = os.path.join(found, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path} is missing: the checkpoint is incomplete")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is unreadable or truncated ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} checkpoint")
    _check_storage_files(found)
    meta["path"] = found
    return meta


def _check_storage_files(folder: str) -> None:
    metadata = SafeReader(folder).read_metadata()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in needed.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        if os.path.getsize(path) < size:
            raise CheckpointError(f"{path} is truncated ({os.path.getsize(path)} of {size} bytes)")


# ---- one process: stored tensors in and out (tools) -------------------------------------------
def read_stored_tensors(path: str, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Every stored tensor of the checkpoint at `path` under `prefix` ("model": the fp32 weights),
    in full, in this process (no process group needed)."""
    meta = read_checkpoint_meta(path)
    folder = meta["path"]
    errors = verify_chunks(folder)
    if errors:
        raise CheckpointError(errors[0])
    metadata = SafeReader(folder).read_metadata()
    parts = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(prefix + ".") and isinstance(md, TensorStorageMetadata):
            full = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            parts[key] = Parts(tuple(md.size), {(0,) * full.dim(): full})
    dcp_load(parts, folder, None)
    return {key[len(prefix) + 1:]: p.views[(0,) * len(p.shape)] for key, p in parts.items()}


def write_model_checkpoint(save_dir: str, tensors: dict[str, torch.Tensor], meta: dict,
                           iteration: int = 0) -> str:
    """Write a model-only checkpoint from one process (full stored tensors; no optimizer, no RNG),
    loadable by pretrain_gpt_moe.py --load with --finetune or --no-load-optim. Returns its
    folder."""
    parts = {f"model.{k}": Parts(tuple(t.shape), {(0,) * t.dim(): t.detach().float().contiguous()})
             for k, t in tensors.items()}
    meta = {**meta, "format": FORMAT, "iteration": iteration, "has_optimizer": False,
            "has_rng": False}
    meta.setdefault("consumed_samples", 0)
    return _publish(save_dir, iteration, lambda tmp: dcp_save(parts, tmp, None), meta, rank=0)


def _publish(root: str, iteration: int, write, meta: dict, rank: int) -> str:
    """Rank 0's part of a one-process save: write into iter_N.tmp, then make it the latest."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "rng"))
    write(tmp)
    write_json(os.path.join(tmp, META), meta)
    make_latest(root, iteration)
    return final


def make_latest(root: str, iteration: int) -> None:
    """Rank 0, once every rank has written iter_N.tmp: rename it to iter_N, fsync, then point the
    tracker at it with an atomic os.replace. A kill anywhere in here leaves a loadable latest."""
    final = iteration_dir(root, iteration)
    old = final + ".old"
    if os.path.exists(final):  # a stale copy of this iteration (the tracker never named it)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(final + ".tmp", final)
    fsync_dir(root)
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


def check_schedule(meta: dict, config) -> None:
    """Megatron's rule on resume: the schedule the flags give must be the checkpoint's, unless
    --override-opt_param-scheduler (the flags win) or --use-checkpoint-opt_param-scheduler."""
    s, o = config.train.schedule, config.optim
    if s.override or s.use_checkpoint:
        return
    now = {"max_lr": o.lr, "min_lr": o.min_lr, "lr_warmup_steps": s.warmup_steps,
           "lr_decay_steps": s.decay_steps, "lr_decay_style": s.decay_style,
           "wd_incr_steps": s.train_iters * s.per_iteration,
           "start_wd": o.weight_decay, "end_wd": o.weight_decay}
    saved = meta.get("scheduler", {})
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if k in saved and saved[k] != v]
    if changed:
        raise CheckpointError(f"{meta['path']}: the learning-rate schedule differs from the "
                              f"checkpoint's ({'; '.join(changed)}; steps in {s.unit}): pass "
                              "--override-opt_param-scheduler to train with the flags' schedule, "
                              "or --use-checkpoint-opt_param-scheduler to keep the checkpoint's")
