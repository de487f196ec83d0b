"""`mars serve`: the policy kept resident behind HTTP, token in, token out.

The API (a subset of vLLM 0.33's own routes and shapes, plus what mars needs):

| route | what |
|---|---|
| POST /inference/v1/generate | vLLM's token-in/token-out request: `token_ids` (ONE <|image_pad|> per image), `content_parts` [{"type": "image_url", "url": "data:image/…;base64,…"}], `sampling_params` {temperature, top_p, top_k, presence_penalty, max_tokens, logprobs: 0, stop_token_ids, logit_bias}. Answer: `choices[0]` {token_ids, logprobs.content[i].logprob, finish_reason "stop"/"length"/"abort", weight_versions}, plus `mars` {weight_version, fingerprint} of the weights that sampled it |
| GET /health | 200 only while loaded and serving, 503 while loading, paused, asleep or failed; the body always says {status, engine, policy, fingerprint, weight_version, max_images, max_image_bytes, max_model_len, pixels, uptime_seconds, stats, trainer}; hf's stats count requests, batches, generated tokens and the seconds the model was busy (a benchmark's idle fraction) |
| POST /load {"path": DIR} | load a checkpoint in place; the weight version goes up by one; a failure answers 422 and the old weights keep serving. Answer: {policy, fingerprint, weight_version, seconds, probe}: `probe` {prompt_ids, token_ids, logprobs, weight_version} is the new weights' answer to the fixed push probe (serve.probe), sampled through the backend's generate, which `update --push` compares with the trainer's forward pass; {error} when it could not run (a paused server is not probed) |
| GET /v1/models, POST /v1/chat/completions, /v1/completions | OpenAI's API for any OpenAI client (serve/openai_api.py): hf renders the chat with the protocol's ChatML and generates through /inference/v1/generate's path (`stream: true` as server-sent events); vllm passes them to vLLM's own routes after the same checks |
| POST /trainer {"id", "state": "following"/"stalled"/"done", "lease": S} | a following trainer's lease (serve/lease.py); /health's `trainer` says "following", "stalled" (its last push failed), "done" or "lost" (no call within the lease), so a rollout waiting for weights learns none will come, or goes ahead while a push failed |
| POST /pause?mode=abort/wait/keep, /resume, GET /is_paused | vLLM's pause: new requests get 503 (keep: queued) |
| POST /sleep?level=N, /wake_up, GET /is_sleeping | free the GPU for a trainer (hf: level 1 moves the weights to host memory, level 2 drops them); a /load wakes a sleeping server first |
| POST /init_weight_transfer_engine, /start_weight_update, /update_weights, /finish_weight_update | vllm only: vLLM's weight-transfer API, forwarded; the finish sets the next weight version (and an optional `fingerprint`) |

The log-probs are of the distribution mars_cli.engines defines: the hf backend computes
them as it samples (the `hf` engine's own generate, engines.hf); vLLM runs with `--logprobs-mode processed_logprobs`.

Why a mars layer in front of `vllm serve` rather than vLLM's server alone, read from
vLLM 0.33's source: its /health answers an empty 200 (no policy, fingerprint or weight
version, and no 503 while a checkpoint loads); its `--api-key` guards only /v1,
/inference and a few other prefixes, while the RL routes it needs (/pause,
/collective_rpc, /sleep; VLLM_SERVER_DEV_MODE=1) stay open to anyone who can connect;
and `collective_rpc("reload_weights", weights_path=…)` loads any directory. So `vllm
serve` runs on 127.0.0.1 on a private port, and the mars layer (a few hundred lines,
no copy of anything vLLM does) is the only listener: it checks the key on every route,
refuses loads outside --allow-load, bounds bodies and images, keeps images to data:
URLs (vLLM would otherwise fetch http URLs), and forwards generation unchanged. Data
parallelism: `--dp N` passes vLLM's own `--data-parallel-size N` (internal load
balancing; its utility calls, reload included, reach every engine); several servers,
one per GPU group, work as well, and the client spreads requests over all of them.
"""
