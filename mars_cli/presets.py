"""Named settings that reproduce a reference setup: sampling profiles and training presets.

`apply` fills in a preset's values for the flags the user left at their defaults, so an
explicit flag always wins (`--preset official-script --lr 2e-6` keeps the other values).

Sampling (`mars rollout --sampling`):
    greedy     T 0 (argmax): deterministic evaluation, mars's default
    official   T 0.7, top-p 0.8, top-k 20, presence penalty 1.5: the official evaluation
               (inference/eval.py defaults; the RL recipe's val_kwargs)

Training (`--preset` on `mars rollout`, `mars advantage` and `mars update`):
    official-script  what the released train_multi_node.sh actually runs: GRPO advantages
                     (adv_estimator=grpo, no batch normalization), verl's token-level
                     PPO-clip loss (`grpo-verl`: clip 0.2 / 0.28, the dual clip c = 3.0,
                     token-mean per micro-batch weighted by its trajectories), lr 1e-5,
                     no KL (use_kl_loss=False), old log-probs from the rollout engine
                     (rollout_correction.bypass_mode=True) and one optimizer step per batch
                     (ppo_mini_batch_size = batch size). Rollout: T 1, presence penalty
                     1.5, seed 3407, 10 turns, 16,384 prompt and 16,384 response tokens
                     within a 32,768-token context, so a turn gets at most
                     min(16,384, 32,768 − the context so far − 1) tokens (the sglang
                     server's max_new_tokens): --max-total-tokens 32,767.
                     The paper describes BN-GSPO instead, which is mars's default.
"""

from __future__ import annotations

from mars_cli.errors import UsageError
from mars_cli.sensenova import EVAL_SAMPLING

SAMPLING: dict[str, dict] = {
    "greedy": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "presence_penalty": 0.0},
    "official": dict(EVAL_SAMPLING),
}

TRAINING: dict[str, dict[str, dict]] = {
    "official-script": {
        "advantage": {"algo": "grpo", "batch_norm": False, "ddof": 1, "eps": 1e-6},
        "update": {"loss": "grpo-verl", "eps_low": 0.2, "eps_high": 0.28, "lr": 1e-5, "beta": 0.0,
                   "old_logprobs": "rollout", "mini_batch": None},
        # train_multi_node.sh: rollout.presence_penalty=1.5, rollout.seed=3407, temperature left at
        # verl's 1.0, multi_turn.max_assistant_turns=10, max_prompt_length = max_response_length
        # = 16,384, max_model_len 32,768; async_sglang_server.py:237 gives a turn
        # min(response_length, max_model_len − prompt − 1): the room of a 32,767 total
        "rollout": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "presence_penalty": 1.5, "seed": 3407,
                    "max_turns": 10, "max_new_tokens": 16384, "max_prompt_tokens": 16384,
                    "max_response_tokens": 16384, "max_total_tokens": 32767},
    },
}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "presence_penalty", "seed")


def split_sampling(preset: dict) -> tuple[dict, dict]:
    """A rollout preset as (its sampling settings, its episode limits)."""
    return ({k: v for k, v in preset.items() if k in SAMPLING_KEYS},
            {k: v for k, v in preset.items() if k not in SAMPLING_KEYS})


def apply(ctx, values: dict, preset: dict) -> dict:
    """`values` with each preset key replaced where the user gave no flag (nor env var)."""
    out = dict(values)
    for key, value in preset.items():
        if key not in out:
            raise KeyError(key)
        # By name: typer may carry its own copy of click's ParameterSource enum.
        source = ctx.get_parameter_source(key) if ctx is not None else None
        if source is None or getattr(source, "name", None) == "DEFAULT":
            out[key] = value
    return out


def training(name: str | None, command: str) -> dict:
    if name is None:
        return {}
    if name not in TRAINING:
        raise UsageError(f"--preset must be one of {', '.join(TRAINING)}, got {name!r}")
    return TRAINING[name][command]


def sampling(name: str | None) -> dict:
    if name is None:
        return {}
    if name not in SAMPLING:
        raise UsageError(f"--sampling must be one of {', '.join(SAMPLING)}, got {name!r}")
    return SAMPLING[name]
