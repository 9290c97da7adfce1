"""Pairs and batch sizes ms-swift refuses only as the run starts (after the job's wait), refused at create: the kind
of training against the installed ms-swift, KTO's and GRPO's batch rules, a reference model, packing and
padding_free, quantization bits, a cached data set with GRPO or streaming, DPO's several loss types. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from application.exceptions import Invalid
from application.services.swift_arguments import closest_names

if TYPE_CHECKING:
    from application.services.swift_info import SwiftInfo


def check_kind(kind: str, rlhf_type: str | None, info: SwiftInfo | None) -> None:
    if kind != "rlhf" or info is None:
        return
    spec = info.arguments.get("RLHFArguments", {}).get("rlhf_type")
    if spec is None:
        raise Invalid(f"kind 'rlhf' needs `swift rlhf`, which ms-swift {info.version} does not have")
    choices = spec.get("choices") or []
    if choices and rlhf_type not in choices:
        raise Invalid(f"rlhf_type '{rlhf_type}' is not one of ms-swift {info.version}'s: {', '.join(choices)}"
                      + closest_names(str(rlhf_type), choices))  # fmt: skip


def check_kto_batch(per_device: int, accumulation: int, gpus: int, arguments: Mapping[str, Any]) -> None:
    """KTO (but for its apo_zero_unpaired loss) needs a total batch of 2 or more: swift fails at once with one."""
    loss = arguments.get("loss_type")  # (a list in ms-swift 4.x's RLHFArguments; swift takes its one item)
    if (loss[0] if isinstance(loss, list) and len(loss) == 1 else loss) == "apo_zero_unpaired":
        return
    total = arguments.get("global_batch_size") or per_device * accumulation * max(1, gpus)
    if isinstance(total, int) and total <= 1:
        raise Invalid("KTO needs a total batch of 2 or more (batch_size x gradient_accumulation_steps x GPUs): "
                      "its KL term would equal the implied reward; raise batch_size or "
                      "gradient_accumulation_steps")  # fmt: skip


# ms-swift's num_generations when a GRPO job does not name one (3.x and 4.x).
GRPO_GENERATIONS = 8
# The largest num_generations a refusal suggests (completions per prompt: 2 to a few dozen in practice).
SUGGESTED_GENERATIONS_MAX = 1024


def check_grpo_batch(per_device: int, accumulation: int, gpus: int, arguments: Mapping[str, Any],
                     split_ratio: float | None = None) -> None:  # fmt: skip
    """GRPO samples num_generations completions per prompt from each generation batch: swift refuses, at once,
    a generation batch they do not divide (ms-swift's `_init_generation_batch_params`, with its defaults: the
    batch is per-device batch x processes x gradient_accumulation_steps). With the server's defaults (1 x 1 x 4)
    and swift's 8 generations every GRPO job failed so. With evaluation on (`split_ratio` above 0, or a
    val_dataset), the eval batch (per_device_eval_batch_size, 1 by default, x processes) must divide by its
    generations too."""
    generations = arguments.get("num_generations", GRPO_GENERATIONS)
    steps, batch = arguments.get("steps_per_generation"), arguments.get("generation_batch_size")
    if not all(isinstance(v, int) for v in (generations, steps or 1, batch or 1)) or generations <= 1:
        return  # (swift says what is wrong with these itself)
    processes = max(1, gpus)
    per_step = per_device * processes
    if batch is None:
        batch = per_step * (steps or accumulation)
    elif batch % per_step:
        raise Invalid(f"training.generation_batch_size ({batch}) must be a multiple of batch_size x GPUs "
                      f"({per_step}) for GRPO")  # fmt: skip
    elif steps is not None and batch != per_step * steps:
        raise Invalid(f"training.generation_batch_size ({batch}) must equal batch_size x GPUs x "
                      f"steps_per_generation ({per_step * steps}) for GRPO: give one of the two")  # fmt: skip
    if batch % generations:
        named = "training.num_generations" if "num_generations" in arguments else \
            f"training.num_generations (ms-swift's default is {GRPO_GENERATIONS})"  # fmt: skip
        # (a bounded search: the batch is the request's number, and a loop up to it held the event loop)
        fits = [n for n in range(2, min(batch, SUGGESTED_GENERATIONS_MAX) + 1) if batch % n == 0][:12]
        hint = f"set it to one of {fits}, or raise the batch" if fits else "make the batch a multiple of it"
        raise Invalid(f"GRPO's generation batch ({batch}: batch_size x GPUs x gradient_accumulation_steps, or "
                      f"generation_batch_size) must be divisible by {named}: {hint}")  # fmt: skip
    evaluates = (split_ratio or 0) > 0 or bool(arguments.get("val_dataset"))
    if evaluates and arguments.get("eval_strategy") != "no":
        per_eval = arguments.get("per_device_eval_batch_size", 1)
        eval_generations = arguments.get("num_generations_eval") or generations
        if (
            isinstance(per_eval, int)
            and isinstance(eval_generations, int)
            and (per_eval * processes) % eval_generations
        ):
            raise Invalid(f"GRPO evaluates (split_dataset_ratio or val_dataset): its eval batch "
                          f"(per_device_eval_batch_size {per_eval} x {processes} process(es)) must be divisible by "
                          f"num_generations_eval ({eval_generations}, else num_generations): set "
                          f"training.per_device_eval_batch_size to a multiple of {eval_generations}, or "
                          "num_generations_eval")  # fmt: skip


def check_ref_model(rlhf_type: str, train_type: str, arguments: Mapping[str, Any]) -> None:
    """swift takes a ref_model only for a full fine-tune with dpo, kto, ppo or grpo; it refuses one at start
    otherwise (LoRA's reference is the base model itself, with the adapter off)."""
    if arguments.get("ref_model") is None or (rlhf_type in ("dpo", "kto", "ppo", "grpo") and train_type == "full"):
        return
    if rlhf_type == "grpo" and arguments.get("beta") == 0:
        return  # (swift drops it: no reference at all)
    why = "LoRA and other adapters use the base model itself" if rlhf_type in ("dpo", "kto", "ppo", "grpo") else \
        f"{rlhf_type} has no reference model"  # fmt: skip
    raise Invalid(f"training.ref_model is only for a full fine-tune (train_type 'full') with dpo, kto, ppo or grpo: "
                  f"{why}; leave it out")  # fmt: skip


# ms-swift 4.x refuses, as it starts, packing or padding_free without a flash attention implementation
# (SftArguments._check_padding_free), and beside an rlhf_type other than these (RLHFArguments).
FLASH_ATTENTION = ("flash_attn", "flash_attention_2", "flash_attention_3", "flash_attention_4")
PACKING_RLHF_TYPES = ("grpo", "dpo", "kto", "gkd")


def check_packing(kind: str, rlhf_type: str | None, arguments: Mapping[str, Any], gpus: int,
                  info: SwiftInfo | None) -> None:  # fmt: skip
    """Packing (which turns padding_free on) and padding_free as ms-swift 4.x takes them: every such job without
    `attn_impl: flash_attn` was accepted and then failed after its wait. (3.x releases differ: left to swift.)"""
    feature = "packing" if arguments.get("packing") else "padding_free" if arguments.get("padding_free") else None
    major = info.version.split(".")[0] if info is not None else ""
    if feature is None or info is None or not major.isdigit() or int(major) < 4:
        return
    where, version = f"training.{feature}", f"ms-swift {info.version}"
    if gpus == 0:  # (attn_impl flash_attn or not: flash-attn runs on a GPU only)
        raise Invalid(f"{where} needs a flash attention implementation in {version}, and flash attention needs "
                      "a GPU: leave it out of a job with num_gpus 0")  # fmt: skip
    if arguments.get("attn_impl") not in FLASH_ATTENTION:
        raise Invalid(f"{where} needs a flash attention implementation in {version}: set training.attn_impl to one "
                      f"of {', '.join(FLASH_ATTENTION)} (flash-attn installed beside ms-swift), or leave "
                      f"{feature} out")  # fmt: skip
    if kind == "rlhf" and rlhf_type not in PACKING_RLHF_TYPES:
        raise Invalid(f"{where} does not work with rlhf_type '{rlhf_type}' in {version} (only with "
                      f"{', '.join(PACKING_RLHF_TYPES)}): leave it out")  # fmt: skip


# What ms-swift's get_quantization_config takes when it loads the model to train (4.x): the bits of each method.
QUANT_BITS: dict[str, tuple[int | str, ...] | None] = {
    "bnb": (4, 8), "hqq": (1, 2, 3, 4, 8), "eetq": (8,), "quanto": (2, 4, 8, "float8"), "fp8": None,
}  # fmt: skip


def check_combinations(rlhf_type: str | None, arguments: Mapping[str, Any]) -> None:
    """Arguments that are fine one by one and that ms-swift refuses together as the run starts (after the wait),
    or that do nothing together."""
    if arguments.get("deepspeed") and arguments.get("fsdp"):
        raise Invalid("training.deepspeed and training.fsdp cannot be used together (ms-swift refuses FSDP with "
                      "DeepSpeed as the run starts): keep one of them")  # fmt: skip
    if rlhf_type == "ppo" and not arguments.get("reward_model"):  # (else an AttributeError as the run starts)
        raise Invalid("rlhf_type 'ppo' needs training.reward_model: its value model starts from the reward model; "
                      "name one (a hub id, or a folder inside MODEL_ROOTS)")  # fmt: skip
    method, bits = arguments.get("quant_method"), arguments.get("quant_bits")
    if bits is not None and method is None:
        raise Invalid("training.quant_bits does nothing without training.quant_method: ms-swift then loads the "
                      "model unquantized; set quant_method (bnb for QLoRA)")  # fmt: skip
    allowed = QUANT_BITS.get(method) if isinstance(method, str) else None
    if allowed is not None and bits is None:
        raise Invalid(f"training.quant_method {method} needs training.quant_bits "
                      f"({', '.join(str(b) for b in allowed)})")  # fmt: skip
    if allowed is not None and bits not in allowed:
        raise Invalid(f"training.quant_bits {bits} does not work with quant_method {method} in ms-swift: use "
                      f"{', '.join(str(b) for b in allowed)}")  # fmt: skip
    if rlhf_type is not None:
        check_loss_types(rlhf_type, arguments)
    if arguments.get("cached_dataset") or arguments.get("cached_val_dataset"):
        if rlhf_type == "grpo":
            raise Invalid("training.cached_dataset is not supported for GRPO by ms-swift: give the data set itself")
        if arguments.get("streaming"):
            raise Invalid("training.streaming does not work with a cached data set in ms-swift: leave one out")


def check_loss_types(rlhf_type: str, arguments: Mapping[str, Any]) -> None:
    """Several loss_type values (MPO) and loss_weights are DPO's alone, one weight per loss type: ms-swift 4.x
    asserts it as the run starts (RLHFArguments._process_loss_type), after the job's wait (hunt DH)."""
    loss, weights = arguments.get("loss_type"), arguments.get("loss_weights")
    types = loss if isinstance(loss, list) else [loss] if loss is not None else []
    if len(types) > 1 and rlhf_type != "dpo":
        raise Invalid(f"several training.loss_type values are for rlhf_type 'dpo' only (ms-swift's mixed "
                      f"preference training), not '{rlhf_type}': give one")  # fmt: skip
    if weights is None:
        return
    if rlhf_type != "dpo":
        raise Invalid(f"training.loss_weights is for rlhf_type 'dpo' only, not '{rlhf_type}': leave it out")
    if isinstance(weights, list) and len(weights) != max(1, len(types)):
        raise Invalid(f"training.loss_weights has {len(weights)} weight(s) for {max(1, len(types))} loss type(s): "
                      "give one weight per training.loss_type value")  # fmt: skip
