"""`uptrain(config)`: fine-tune (or pre-train) a model with accelerate, attention on our kernels.

The run, in order:

1. refuse what cannot work, before any weights are read (ValueError): bad values, a missing or
   empty data source, an encoder without a teacher, a teacher that does not fit the student,
   sequences longer than the model's positions or the data, token ids outside the vocabulary;
2. build the `Accelerator` (bf16 autocast on CUDA, gradient accumulation), load the student in
   float32 and the teacher (inference only, in the autocast dtype), patch both, switch on
   gradient checkpointing, prepare model and optimizer (fused AdamW on CUDA);
3. optionally resume: `accelerator.load_state` (weights, optimizer, RNG) plus trainer_state.json
   (step, data position, losses), once the checkpoint is known to match this run (checkpoints.py);
4. train: per step, `grad_accum` micro-batches under `accelerator.accumulate`, clipping, the
   schedule's learning rate. Per-step losses stay on the device; the host reads them only when
   it logs or saves;
5. save the final model, unpatched, with save_pretrained (GQA-BERT in the layout load_gqa_bert
   reads), plus the tokenizer.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from ..patch import UnsupportedModelError, is_patched, patch_model, unpatch_model
from .checkpoints import (CHECKPOINTS, STATE_NAME, check_output_dir, check_resume, check_same_model,
                          find_resume_point, model_fingerprint, prepare_output_dir, save_checkpoint, save_final)
from .config import UptrainConfig, UptrainResult
from .data import SequenceOrder, check_data_source, describe, fingerprint, is_text, load_token_ids, pack
from .distributed import check_checkpoint_kind, describe_sharding, full_state_dict
from .modeling import (CAUSAL, ENCODER, describe_model, disable_gradient_checkpointing,
                       enable_gradient_checkpointing, load_model, load_tokenizer, zero_attention_dropout)
from .objectives import Objective, objective_name

__all__ = ["uptrain", "lr_at", "STATE_NAME", "CHECKPOINTS"]


def uptrain(config: UptrainConfig) -> UptrainResult:
    """Run `config` and return what was done (see UptrainConfig, UptrainResult, docs/uptraining.md).

    Models given as instances are handed back as they came, also when the run fails or is
    interrupted (Ctrl-C in a notebook): patching, attention dropout, gradient checkpointing,
    training mode and use_cache are restored. Their weights keep the updates made so far.
    """
    undo_on_failure: list = []
    try:
        return _run(config, undo_on_failure)
    except BaseException:
        for undo in reversed(undo_on_failure):
            undo()
        raise


def _run(config: UptrainConfig, undo_on_failure: list) -> UptrainResult:
    started = time.perf_counter()

    # --- 1. refuse what cannot work -------------------------------------------------------------
    config.check()
    spec = describe_model(config.model)
    teacher_spec = describe_model(config.teacher, "teacher") if config.teacher is not None else None
    _check_teacher(spec, teacher_spec)
    check_data_source(config.data)
    if spec.max_positions is not None and config.seq_len > spec.max_positions:
        raise ValueError(f"seq_len {config.seq_len} is longer than the model's max_position_embeddings "
                         f"{spec.max_positions}")
    output_dir = Path(config.output_dir)
    resume_point = find_resume_point(config.resume, output_dir)
    check_output_dir(output_dir, resume_point, resume_requested=config.resume is not False)
    resume_dir = resume_point.folder if resume_point is not None else None
    tokenizer = load_tokenizer(config.tokenizer, spec, required=is_text(config.data))
    sequences = pack(load_token_ids(config.data, tokenizer=tokenizer, token_dtype=config.token_dtype), config.seq_len)
    low, high = int(sequences.min()), int(sequences.max())
    if low < 0 or (spec.vocab_size is not None and high >= spec.vocab_size):
        raise ValueError(f"the data holds token ids in [{low}, {high}], outside the model's vocabulary "
                         f"[0, {spec.vocab_size}); wrong tokenizer or token_dtype?")
    objective_label = objective_name(spec.kind, teacher_spec is not None, config.distill_weight)
    separator = _doc_separator(config, spec)

    # --- 2. accelerator, models, optimizer ----------------------------------------------------
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    # An encoder's head (BERT's pooler) gets no gradient from the hidden-state objective; DDP must know.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=spec.kind == ENCODER)
    accelerator = Accelerator(mixed_precision=_mixed_precision(config.mixed_precision),
                              gradient_accumulation_steps=config.grad_accum, log_with=config.log_with,
                              kwargs_handlers=[ddp],
                              project_dir=os.fspath(output_dir) if config.log_with else None)
    say = _printer(accelerator, config.quiet)
    set_seed(config.seed)
    nproc, rank = accelerator.num_processes, accelerator.process_index
    per_step = config.batch_size * config.grad_accum * nproc  # sequences per optimizer step
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    layout = dict(seq_len=config.seq_len, batch_size=config.batch_size, grad_accum=config.grad_accum,
                  num_processes=nproc, num_sequences=len(sequences), shuffle=config.shuffle, seed=config.seed,
                  data_fingerprint=fingerprint(sequences))
    if separator is not None:  # only then: checkpoints written before packing existed still resume
        layout["doc_separator"] = separator
    if resume_point is not None:  # before any weights are read
        check_resume(resume_point, max_steps=config.max_steps, objective=objective_label, layout=layout)
    prepare_output_dir(output_dir)

    model = load_model(spec, torch.float32)
    model_id = model_fingerprint(model)
    if resume_point is not None:
        check_same_model(resume_point, model_id)
    given = model if model is config.model else None  # a caller's instance is handed back as it came
    given_state = _ModelState.capture(model)
    if config.patch:
        patch_model(model)  # raises UnsupportedModelError (a ValueError) for models we cannot run
    elif is_patched(model):
        unpatch_model(model)
    restore_dropout = zero_attention_dropout(model) if config.zero_attention_dropout else (lambda: None)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    model.train()
    if given is not None:
        undo_on_failure.append(lambda: _hand_back(given, given_state, restore_dropout, config.gradient_checkpointing))
    student_is_base = model.base_model is model

    teacher, teacher_given_state = None, None
    if teacher_spec is not None:
        teacher = load_model(teacher_spec, autocast_dtype if accelerator.device.type == "cuda" else torch.float32)
        teacher_given_state = _ModelState.capture(teacher) if teacher is config.teacher else None
        if teacher_given_state is not None:
            undo_on_failure.append(lambda: teacher_given_state.restore(teacher))
        if config.patch and not is_patched(teacher):
            try:
                patch_model(teacher)
            except UnsupportedModelError:
                say(f"teacher {teacher_spec.name}: not patchable, it runs on stock attention")
        teacher.to(accelerator.device).eval().requires_grad_(False)
    objective = Objective(spec.kind, teacher=teacher, distill_weight=config.distill_weight,
                          temperature=config.distill_temperature, autocast=accelerator.autocast,
                          student_is_base=student_is_base,
                          teacher_is_base=teacher is None or teacher.base_model is teacher,
                          doc_separator=separator)

    optimizer = _adamw(model, config, fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.log_with:
        accelerator.init_trackers("uptrain", config={k: v for k, v in vars(config).items()
                                                     if isinstance(v, (int, float, str, bool))})

    # --- 3. resume --------------------------------------------------------------------------------
    step, losses = 0, []
    if resume_point is not None:
        check_checkpoint_kind(resume_dir, accelerator)
        accelerator.load_state(os.fspath(resume_dir))
        step, losses = resume_point.step, [tuple(x) for x in resume_point.state["losses"]]
        say(f"resumed from {resume_dir} at step {step}")

    say(f"uptrain {spec.name} ({spec.kind}, objective {objective.name}) on {describe(config.data)}: "
        f"{len(sequences)} sequences of {config.seq_len} tokens; {nproc} process(es) x batch {config.batch_size} "
        f"x accum {config.grad_accum} = {per_step * config.seq_len:,} tokens/step ({describe_sharding(accelerator.state)}); "
        f"mixed precision {accelerator.mixed_precision}; "
        f"{f'packed documents (separator {separator}); ' if separator is not None else ''}attention on "
        f"{'hf_attn_patch kernels (forward and backward)' if config.patch else 'stock transformers'}")

    # --- 4. train ---------------------------------------------------------------------------------
    order = SequenceOrder(len(sequences), seed=config.seed, shuffle=config.shuffle)
    device = accelerator.device
    pin = device.type == "cuda"
    first = step
    step_losses = torch.zeros(max(config.max_steps - first, 1), device=device)
    logged = first  # steps whose losses are on the host
    clock, clock_step = time.perf_counter(), step
    checkpoints = []

    def flush() -> None:
        """Bring the losses of steps logged+1 .. step to the host (one sync), log a line."""
        nonlocal logged, clock, clock_step
        if step == logged:
            return
        window = accelerator.reduce(step_losses[logged - first:step - first], reduction="mean").tolist()
        losses.extend((logged + 1 + i, value) for i, value in enumerate(window))
        now = time.perf_counter()
        rate = (step - clock_step) * per_step * config.seq_len / max(now - clock, 1e-9)
        mean = sum(window) / len(window)
        say(f"step {step}/{config.max_steps} | loss {mean:.4f} | lr {lr_at(step - 1, config):.3g} | "
            f"{rate:,.0f} tok/s | {time.perf_counter() - started:.1f} s")
        if config.log_with:
            accelerator.log({"loss": mean, "lr": lr_at(step - 1, config)}, step=step)
        logged, clock, clock_step = step, now, step

    while step < config.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        total = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            position = (step * config.grad_accum + micro) * config.batch_size * nproc + rank * config.batch_size
            batch = sequences[order.rows(position, config.batch_size)]
            batch = (batch.pin_memory() if pin else batch).to(device, non_blocking=pin)
            with accelerator.accumulate(model):
                loss = objective(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if micro != config.grad_accum - 1:
                        raise RuntimeError("accelerate's accumulation counter is out of step with the data")
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        step_losses[step - first] = total / config.grad_accum
        step += 1
        if step % config.log_every == 0 or step == config.max_steps:
            flush()
        if config.save_every and step % config.save_every == 0:
            flush()
            state = dict(step=step, sequences_seen=step * per_step, tokens_seen=step * per_step * config.seq_len,
                         layout=layout, objective=objective.name, model=model_id, losses=losses)
            checkpoints.append(save_checkpoint(accelerator, output_dir, step, state, config.save_total_limit))

    # --- 5. final model ---------------------------------------------------------------------------
    flush()
    accelerator.wait_for_everyone()
    weights = full_state_dict(accelerator, model)  # FSDP: the shards gathered on the main process
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    restore_dropout()
    if config.gradient_checkpointing:
        disable_gradient_checkpointing(model)
    given_state.restore_config(model)
    if is_patched(model):
        unpatch_model(model)  # save_pretrained from the stock model: loads into plain transformers
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        save_final(model, tokenizer if tokenizer != "bytes" else None, output_dir, state_dict=weights)
    accelerator.wait_for_everyone()
    if given is not None:
        given_state.restore(model)
    if teacher_given_state is not None:
        teacher_given_state.restore(teacher)
    if config.log_with:
        accelerator.end_training()
    say(f"saved {final_dir}")
    return UptrainResult(steps=step, tokens_seen=step * per_step * config.seq_len, losses=losses,
                         final_dir=final_dir, seconds=time.perf_counter() - started, resumed_from=resume_dir,
                         checkpoints=checkpoints, objective=objective.name)


def lr_at(step: int, config: UptrainConfig) -> float:
    """Learning rate of update number `step` (0-based): linear warm-up, then the schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    if config.schedule == "cosine":
        return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr - (config.lr - floor) * progress


# --- helpers ----------------------------------------------------------------------------------


class _ModelState:
    """What uptrain changes on a model it was given, to hand it back as it came."""

    def __init__(self, patched: bool, training: bool, use_cache):
        self.patched, self.training, self.use_cache = patched, training, use_cache

    @classmethod
    def capture(cls, model) -> "_ModelState":
        return cls(is_patched(model), model.training, getattr(model.config, "use_cache", None))

    def restore_config(self, model) -> None:
        if self.use_cache is not None:
            model.config.use_cache = self.use_cache

    def restore(self, model) -> None:
        self.restore_config(model)
        if self.patched and not is_patched(model):
            patch_model(model)
        elif not self.patched and is_patched(model):
            unpatch_model(model)
        model.train(self.training)


def _hand_back(model, state: _ModelState, restore_dropout, checkpointing: bool) -> None:
    """Undo what a failed run changed on a model it was given (not its weights)."""
    restore_dropout()
    if checkpointing:
        disable_gradient_checkpointing(model)
    state.restore(model)


def _doc_separator(config: UptrainConfig, spec) -> int | None:
    """The token id that ends a document when packing (None without packing); ValueError if none."""
    if not config.packing:
        return None
    if spec.kind == ENCODER:
        raise ValueError("UptrainConfig.packing is for causal LMs: transformers builds an encoder's (BERT's) "
                         "mask without position_ids, so its documents would attend to each other")
    separator = config.doc_separator
    if separator is None:
        separator = getattr(spec.config, "eos_token_id", None)
        if isinstance(separator, (list, tuple)):
            separator = separator[0] if separator else None
    if separator is None:
        raise ValueError("UptrainConfig.packing needs the token id that ends a document: the model config has "
                         "no eos_token_id; pass doc_separator=")
    return int(separator)


def _check_teacher(spec, teacher) -> None:
    if teacher is None:
        if spec.kind == ENCODER:
            raise ValueError(f"{spec.name} is an encoder ({spec.config.model_type}, no LM head): distillation "
                             "toward the original model's hidden states is its only objective, so pass "
                             "teacher= (the unconverted checkpoint)")
        return
    if spec.kind == CAUSAL:
        if teacher.kind != CAUSAL:
            raise ValueError(f"the student {spec.name} is a causal LM but the teacher {teacher.name} is not")
        if teacher.vocab_size != spec.vocab_size:
            raise ValueError(f"teacher vocabulary {teacher.vocab_size} != student vocabulary {spec.vocab_size}")
    elif getattr(teacher.config, "hidden_size", None) != getattr(spec.config, "hidden_size", None):
        raise ValueError(f"teacher hidden size {getattr(teacher.config, 'hidden_size', None)} != student hidden "
                         f"size {getattr(spec.config, 'hidden_size', None)}")


def _mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return "bf16" if torch.cuda.is_available() and not cpu and torch.cuda.is_bf16_supported() else "no"


def _adamw(model, config: UptrainConfig, fused: bool) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": params, "weight_decay": decay_rate}
              for params, decay_rate in ((decay, config.weight_decay), (no_decay, 0.0)) if params]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas), **kwargs)


def _printer(accelerator, quiet: bool):
    def say(message: str) -> None:
        if not quiet and accelerator.is_main_process:
            print(f"[uptrain] {message}", flush=True)

    return say

