"""Pretraining: model and optimizer set-up, the train loop (steps, evaluation, saves, exits)."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch

from megatron.checkpoint import Checkpointer, Resumed, config_dict, read_checkpoint_meta
from megatron.checkpoint.upcycle import check_upcycling, upcycle
from megatron.data.datasets import build_train_valid_test_datasets
from megatron.data.loader import MicroBatchSampler, batches
from megatron.parallel import comm
from megatron.parallel.topology import TEDGroups
from megatron.training import lr_schedule
from megatron.training.config import Config
from megatron.training.exits import ExitControl
from megatron.training.forward_backward import context_sum, train_step
from megatron.training.log import TrainLog, print_rank0
from megatron.training.monitor import (ManualGC, Timers, apply_runtime, open_wandb, step_extras,
                                       time_model)
from megatron.training.optimizer import NonFiniteError, Optimizer
from megatron.training.pipeline import Pipeline, reduce_over_stages
from ted_patches.build import build_model


# ---- set-up -------------------------------------------------------------------------------------
def build_scheduler(optimizer: Optimizer, cfg: Config):
    o = cfg.optim
    return lr_schedule.build_scheduler(optimizer, cfg.train.schedule, o.lr, o.min_lr,
                                       o.weight_decay)


@torch.no_grad()
def evaluate(model, dataset, first_step: int, cfg: Config, groups: TEDGroups, device,
             pipeline: Optional[Pipeline] = None) -> float:
    """Mean LM loss over --eval-iters global batches of `dataset`, from batch `first_step`."""
    model.eval()
    lm, count = torch.zeros((), dtype=torch.float64, device=device), 0
    t = cfg.train
    for mbs in batches(dataset,
                       _sampler(first_step * t.global_batch_size, t.eval_iters, cfg, groups),
                       cfg.data.num_workers, device, groups.cp):
        if pipeline is None:
            lm += sum(model(**mb).lm_loss.double() for mb in mbs)
        else:  # the losses come out of the last stage
            lm += pipeline.run(mbs, 1.0, train=False)[0]
        count += len(mbs)
    model.train()
    total = torch.stack([reduce_over_stages(lm, groups), lm.new_tensor(count)])
    context_sum(total[:1], groups)
    comm.all_reduce_(total, groups.dp)
    return (total[0] / total[1]).item()


def _sampler(first_sample: int, steps: int, cfg: Config, groups: TEDGroups) -> MicroBatchSampler:
    t = cfg.train
    return MicroBatchSampler(first_sample, steps, t.micro_batch_size, t.global_batch_size,
                             groups.dp.size, groups.dp.rank)


# ---- the loop -----------------------------------------------------------------------------------
def _save(checkpointer, iteration: int, consumed: int, run: dict, model, optimizer,
          scheduler) -> None:
    start = time.time()
    checkpointer.save(iteration, {**run, "consumed_samples": consumed}, model, optimizer, scheduler)
    # an async save says "checkpoint saved ... (async, X s)" itself, once committed
    mode = "started (async)" if checkpointer.cfg.async_save else "saved"
    print_rank0(f"> checkpoint {mode} at iteration {iteration} in {checkpointer.cfg.save} "
                f"({time.time() - start:.2f} s)")


def run_description(cfg: Config) -> dict:
    """What a checkpoint records of the run, besides its state (JSON-able)."""
    return {"model": config_dict(cfg.model), "moe": config_dict(cfg.moe) if cfg.moe else None,
            "tokenizer": _tokenizer_record(cfg.data),
            "global_batch_size": cfg.train.global_batch_size,
            "data": {"data_path": cfg.data.data_path, "split": cfg.data.split,
                     "mock": cfg.data.mock}}


def _tokenizer_record(data) -> dict:
    def absolute(path):
        return None if path is None else os.path.abspath(path)

    return {"tokenizer_type": data.tokenizer_type,
            "tokenizer_model": absolute(data.tokenizer_model),
            "vocab_file": absolute(data.vocab_file), "merge_file": absolute(data.merge_file),
            "vocab_size": data.vocab_size}


def warn_on_changes(saved: dict, now: dict, log) -> None:
    """Resuming with another global batch size or data blend is allowed, with one warning each."""
    if saved.get("global_batch_size") != now["global_batch_size"]:
        log(f"WARNING: the checkpoint was trained with --global-batch-size "
            f"{saved.get('global_batch_size')}, now {now['global_batch_size']}: training continues "
            "from its consumed samples")
    if saved.get("data") != now["data"]:
        log(f"WARNING: the checkpoint was trained on {saved.get('data')}, now on {now['data']}")


def pretrain(cfg: Config, tokenizer, groups: TEDGroups, device) -> dict:
    """Train for --train-iters (resuming from --load), evaluating every --eval-interval and saving
    every --save-interval and at the end; returns the loss history of the iterations run here."""
    t, ck = cfg.train, cfg.checkpoint
    if groups.topology != cfg.topology:  # the groups were built for another layout
        raise ValueError(f"process groups of {groups.topology.describe()} for a run configured as "
                         f"{cfg.topology.describe()}")
    for notice in cfg.notices:
        print_rank0(f"> notice: {notice}")
    apply_runtime(cfg.runtime, cfg.log, device, print_rank0)
    model = build_model(cfg.model, cfg.moe, groups, seed=t.seed, device=device,
                        recompute=cfg.recompute, stages=cfg.stages)
    pipeline = None
    if cfg.stages is not None:
        pipeline = Pipeline(model, cfg.stages, groups, t.num_microbatches(groups.dp.size),
                            t.micro_batch_size, t.seq_length, device)
    upcycled_from = None
    if cfg.moe is not None and cfg.moe.use_upcycling:  # --moe-use-upcycling: from a dense model
        upcycled_from = check_upcycling(cfg.model, cfg.moe, ck.load, ck.save)
        kept = upcycle(model, cfg.moe, upcycled_from, groups)
        print_rank0(f"> upcycled {upcycled_from}: every expert a copy of its layer's dense MLP, "
                    f"{kept} router tensors from --seed")
    optimizer = Optimizer(model, groups, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg)
    checkpointer = Checkpointer(ck, groups)
    run = run_description(cfg)
    resumed = Resumed()
    if ck.load and not upcycled_from:  # upcycled: the dense weights are already the model's
        resumed = checkpointer.load(model, optimizer, scheduler, print_rank0)
        if resumed.iteration:
            warn_on_changes(read_checkpoint_meta(ck.load), run, print_rank0)
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        data_path=cfg.data.data_path, split=cfg.data.split, mock=cfg.data.mock,
        seq_length=t.seq_length, seed=t.seed, tokenizer=tokenizer, num_samples=t.num_samples(),
        cache_dir=cfg.data.cache_dir, eod_mask_loss=cfg.data.eod_mask_loss,
        mmap_bin_files=cfg.data.mmap_bin_files,
    )
    stages = ""
    if cfg.stages is not None:
        s = cfg.stages
        stages = (f"; pipeline schedule {s.schedule}, {s.num_stages} stages of "
                  f"{s.layer_counts()} layers")
    print_rank0(f"> {cfg.topology.describe()}; {sum(p.numel() for p in model.parameters()):,} "
                f"parameters on rank 0; {t.num_microbatches(groups.dp.size)} micro-batches of "
                f"{t.micro_batch_size} per step and DP rank{stages}")
    timers = Timers(cfg.log.timing_log_level, cfg.log.timing_log_option, groups.world)
    optimizer.reduce_gradients = timers.wrap("all-grads-sync", optimizer.reduce_gradients)
    time_model(timers, pipeline.chunks if pipeline is not None else [model])
    rank0 = groups.world.rank == 0
    log = TrainLog(cfg, enabled=rank0, timers=timers,
                   wandb=open_wandb(cfg.log, ck.save, run, print_rank0) if rank0 else None)
    manual_gc = ManualGC(cfg.runtime)
    history = {"lm_loss": [], "valid": [], "test": None}
    eval_round = resumed.iteration // t.eval_interval  # validation batches already used
    consumed = resumed.consumed_samples
    exits = ExitControl(cfg.exit, groups, device)
    try:  # the signal goes back to its previous handler however training ends (a raise included)
        sampler = _sampler(consumed, t.train_iters - resumed.iteration, cfg, groups)
        train_batches = batches(train_ds, sampler, cfg.data.num_workers, device, groups.cp)
        for iteration in range(resumed.iteration + 1, t.train_iters + 1):
            started = time.perf_counter()
            with timers.time("batch-generator"):
                microbatches = next(train_batches)
            try:
                metrics = train_step(model, optimizer, microbatches, groups, pipeline)
            except NonFiniteError as e:
                last = checkpointer.latest or "none (no checkpoint was saved or loaded)"
                raise NonFiniteError(f"iteration {iteration}: {e}; training stopped before the "
                                     f"update (the last good checkpoint: {last}; "
                                     "--no-check-for-nan-in-loss-and-grad trains on "
                                     "regardless)") from None
            consumed += t.global_batch_size
            lr = optimizer.param_groups[0]["lr"]
            # as Megatron: a skipped fp16 step does not advance the schedule
            if not metrics.skipped:
                scheduler.step(t.schedule.per_iteration)
            history["lm_loss"].append(metrics.lm_loss)
            extra = step_extras(cfg.log, optimizer, groups, metrics, timers)
            log.step(iteration, metrics, lr, consumed,
                     {**metrics.timers, "iteration": time.perf_counter() - started}, extra)
            manual_gc.after_iteration(iteration)
            if valid_ds is not None and t.eval_iters and iteration % t.eval_interval == 0:
                manual_gc.around_evaluation()
                loss = evaluate(model, valid_ds, eval_round * t.eval_iters, cfg, groups, device,
                                pipeline)
                manual_gc.around_evaluation()
                eval_round += 1
                history["valid"].append((iteration, loss))
                log.evaluation(iteration, "validation", loss)
            stop = exits.reason(iteration)
            interval = ck.save_interval and iteration % ck.save_interval == 0
            if ck.save and (interval or stop or iteration == t.train_iters):
                _save(checkpointer, iteration, consumed, run, model, optimizer, scheduler)
            if stop:
                checkpointer.close()
                optimizer.wait_params()
                print_rank0(f"> exiting at iteration {iteration}: {stop}")
                log.close()
                return history
        checkpointer.close()
        optimizer.wait_params()
    finally:
        exits.close()
        manual_gc.close()
    if valid_ds is not None and t.eval_iters and t.train_iters % t.eval_interval:
        loss = evaluate(model, valid_ds, eval_round * t.eval_iters, cfg, groups, device,
                        pipeline)
        history["valid"].append((t.train_iters, loss))
        log.evaluation(t.train_iters, "validation", loss)
    if test_ds is not None and t.eval_iters:
        history["test"] = evaluate(model, test_ds, 0, cfg, groups, device, pipeline)
        log.evaluation(t.train_iters, "test", history["test"])
    log.close()
    sys.stdout.flush()
    return history
