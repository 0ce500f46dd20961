"""The run config: every field, its default and its meaning, in one place.

A config file `configs/NAME.py` defines `get_config()` returning `default_config()` with changes.
Any field can be overridden on the command line: `--config.optim.learning_rate=2e-5`.

## model
| key | default | meaning |
|---|---|---|
| `path` | `''` | Hugging Face model folder, `.gguf` file or converted jaxsft checkpoint (`python -m jaxsft.convert`); local or `gs://`; or a Hugging Face Hub id (`owner/name`, not an existing local path): downloaded once into the HF cache, read from there offline (`jaxsft/hub.py`). |
| `init` | `'pretrained'` | `'pretrained'`: weights from `path`; `'random'`: `path`'s config.json with random weights (demos, benchmarks). |
| `param_dtype` | `'float32'` | Master weights (and with them Adam's second moment): `float32` or `bfloat16`. Full fine-tuning refuses `bfloat16` below `optim.learning_rate` 2^-13 ~ 1.2e-4, where it rounds the AdamW updates of most weights away (LoRA, whose adapters are float32, may keep bf16 base weights). |
| `compute_dtype` | `'bfloat16'` | Matmul dtype: bf16 matmuls accumulate in float32, forward and backward (`jaxsft.models.dots`). Softmax, norms and the loss always run in float32. |
| `remat` | `'full'` | Activation recomputation per layer: `none`, `full`, `dots` (save matmul outputs), `dots_no_batch`, or `auto` (the recipes' default): the least recomputation of `none` -> `dots` -> `full` whose compiled memory plan fits the device, chosen at start and logged (`jaxsft.memory`; with an unknown device size, `none`). |
| `attention` | `'auto'` | `auto` (cuDNN on NVIDIA GPUs, splash on TPU, else xla), `xla`, `cudnn`, `splash`. |

## data
The `data` section is documented in `jaxsft/data/config.py` (sources, batch size in samples,
`max_seq_len`, micro-batch rows, masking, packing).

## optim
| key | default | meaning |
|---|---|---|
| `learning_rate` | `2e-5` | Peak learning rate (the paper: 2e-5; 1e-6 for Mistral). |
| `schedule` | `'constant'` | `constant` (the paper's recipe), `warmup_constant`, `warmup_linear`, `warmup_cosine`. |
| `warmup_steps` | `0` | Warmup length in optimizer steps. |
| `warmup_fraction` | `0.0` | Warmup as a fraction of the run's steps (instead of `warmup_steps`). |
| `final_lr_fraction` | `0.0` | Decay schedules end at this fraction of `learning_rate`. |
| `b1`, `b2`, `eps` | `0.9`, `0.999`, `1e-8` | AdamW moments (the transformers Trainer defaults). |
| `weight_decay` | `0.0` | Decoupled weight decay; never applied to norms and biases. |
| `clip_norm` | `1.0` | Global gradient-norm clipping (0 = off). Metrics report the norm before clipping. |
| `state_dtype` | `'float32'` | Dtype of Adam's first moment (`bfloat16` saves memory). |
| `offload` | `'none'` | Where the float32 master weights and Adam moments live: `none` (on the devices), `host` (pinned host memory) or `disk` (a TensorStore store in `offload_dir`). With `host`/`disk` the devices hold only compute-dtype params and the gradient accumulator, and the update streams the state through in layer groups (`docs/memory.md`; full fine-tuning of 8B on one 80 GB GPU). |
| `offload_dir` | `''` | Local directory of the `disk` tier's live state (fast local disk; `''` = `output_dir/offload`). |

## train
| key | default | meaning |
|---|---|---|
| `output_dir` | `'runs/run'` | Run directory: config, metrics, events, checkpoints, exports. One run writes to it at a time (`writer.lock`, `jaxsft/writer_lock.py`): a second is refused with status 2. |
| `num_steps` | `0` | Optimizer steps; 0 = `num_epochs` passes over the data. |
| `num_epochs` | `1.0` | Used when `num_steps` is 0. |
| `seed` | `0` | Seeds random initialisation (model.init='random'). Data order has `data.seed`. |
| `log_every` | `1` | Metrics every N steps (every step is still computed exactly). |
| `eval_every` | `0` | Held-out loss every N steps (0 = at the start and the end only). |
| `eval_at_start` | `True` | Evaluate before the first step. |
| `export_hf` | `False` | Write a Hugging Face folder to `output_dir/hf` at the end. |
| `export_dtype` | `'bfloat16'` | Dtype of that export. `float32` writes the float32 master weights, also of an offloaded run (`optim.offload='host'/'disk'`, whose devices hold only a compute-dtype copy). |
| `export_gguf` | `''` | Also write GGUF files that llama.cpp and Ollama run as they are, at the end: `output_dir/model.gguf` (a LoRA run's merged model) with tensors of this type (`f32`, `f16`, `bf16`, `q8_0`), and for a LoRA run `output_dir/adapter.gguf` (the adapters as a llama.cpp LoRA adapter, float32, rsLoRA's scale folded in). Llama, Mistral, Qwen2, Qwen3 and Granite with a byte-level BPE or a SentencePiece BPE (Llama 2, Mistral) tokenizer; anything else is refused at start-up. `''` = off. |
| `progress` | `True` | Console progress bar with ETA. |
| `stop_after_steps` | `0` | Stop (checkpoint, evaluate) after this many steps while the schedule still spans the whole run, so the run can be continued later (sweeps stop runs at a rung this way); 0 = run to the end. |
| `compile_cache_dir` | `'~/.cache/jaxsft/jax_compile'` | JAX's persistent compilation cache: a resumed run or sweep rung loads its compiled steps instead of compiling again. The default is `$XDG_CACHE_HOME/jaxsft/jax_compile` when that is set; `''` = off. |
| `push_to_hub` | `''` | Hugging Face Hub repo id (`owner/name`) the `hf/` export is uploaded to at the end (needs `export_hf`; created if missing, with the account's default visibility; credentials from `HF_TOKEN` or `hf auth login`); `''` = off. |

## metrics
Where metrics go besides metrics.jsonl, eval.jsonl, TensorBoard and the progress bar.
| key | default | meaning |
|---|---|---|
| `wandb.project` | `''` | Weights & Biases project; `''` = no W&B run. Needs `pip install 'jaxsft[wandb]'`. A resumed run continues the same W&B run (its id is kept in `output_dir/wandb_run_id`). |
| `wandb.entity` | `''` | W&B user or team (`''` = your default entity). |
| `wandb.name` | `''` | Display name of the run (`''` = a name W&B makes up). |
| `wandb.mode` | `'online'` | `online`, `offline` (files under `output_dir/wandb` for a later `wandb sync`; needs no network or account) or `disabled`. The `WANDB_MODE` environment variable, when set, overrides it. |

## health
Online checks of every step (`jaxsft/metrics/health.py`). Actions: `stop` (the run ends with an
error naming the step; the failing step's parameters are never checkpointed), `warn` (the step
gets an `alerts` list in metrics.jsonl and a warning on the console), `off`.

| key | default | meaning |
|---|---|---|
| `on_nan` | `'stop'` | NaN or Inf in the loss, the gradient norm or the updated parameters' norm. |
| `on_loss_spike` | `'warn'` | Loss above `loss_spike_ratio` x the median of the previous `spike_window` steps. |
| `on_grad_spike` | `'warn'` | Pre-clip gradient norm above `grad_spike_ratio` x its rolling median. |
| `spike_window` | `20` | Steps in the rolling median (a check needs at least 5). |
| `loss_spike_ratio` | `1.5` | See `on_loss_spike`. |
| `grad_spike_ratio` | `10.0` | See `on_grad_spike`. |

## lora
LoRA adapters on the decoder layers' projections (`jaxsft/models/lora.py`, `docs/lora.md`); only
they are trained, the base weights stay as loaded. Adapters are exported as a Hugging Face PEFT
folder (`output_dir/adapter`; with `train.export_hf` also the merged model in `output_dir/hf`).
| key | default | meaning |
|---|---|---|
| `r` | `0` | Adapter rank; 0 = full fine-tuning. |
| `alpha` | `16.0` | Scale numerator: adapters are scaled by alpha / r (alpha / sqrt(r) with `use_rslora`). |
| `dropout` | `0.0` | Dropout on the adapters' input while training (masks drawn from `train.seed`, step and micro-batch). |
| `target_modules` | `'all-linear'` | As PEFT's: `'all-linear'` (q/k/v/o/gate/up/down), a list of module names (`['q_proj', 'v_proj']`), or a regex string the whole module name must match (`'.*(q|v)_proj'`). |
| `layers` | `[]` | Layer indices to adapt (PEFT's `layers_to_transform`, with a list of target names); empty = all. |
| `use_rslora` | `False` | rsLoRA scaling alpha / sqrt(r). |
| `lr_ratio` | `1.0` | LoRA+: B's learning rate (and decoupled weight decay) is this times A's (the paper: 16). |
| `adapter_path` | `''` | Start from this PEFT adapter folder (its rank, alpha and targets replace the fields above). |
| `base_quant` | `''` | `'nf4'`: QLoRA. The frozen base's linear projections are stored as bitsandbytes NF4 (blocks of 64, double-quantized statistics, bit for bit as `bitsandbytes.functional.quantize_4bit`), quantized while `model.path` is read; each layer dequantizes its own weights to `model.compute_dtype` inside the step. Embeddings, norms and the LM head stay in `model.param_dtype`. A bitsandbytes 4-bit NF4 checkpoint (`*-bnb-4bit`) is read as NF4 whatever this says. Needs LoRA (`lora.r > 0`). |
| `init` | `'default'` | How fresh adapters start. `'default'`: PEFT's (A Kaiming-uniform, B = 0: the model starts as its base). `'loftq'`: LoftQ (PEFT's `init_lora_weights='loftq'`, one iteration), with `base_quant='nf4'`: each adapter starts as the rank-r SVD of its weight's quantization error W - dequant(nf4(W)), split so that scale * A B equals it, so the NF4 base plus the adapters starts near the full-precision model. The base is unchanged (a run's adapter loads in PEFT on the bitsandbytes-quantized base). Needs the full-precision weights at load (one SVD per adapted weight, on the default device): not a checkpoint stored in 4-bit. PEFT's LoftQ leaves the scale out (the same adapters when alpha == r). |

## mesh
| key | default | meaning |
|---|---|---|
| `data`, `fsdp`, `tensor` | `1`, `-1`, `1` | Device mesh axis sizes; one may be -1 to take the remaining devices. Params and optimizer state are sharded over `fsdp` (and `tensor`); batches over `data` x `fsdp`. |

## checkpoint
| key | default | meaning |
|---|---|---|
| `every_steps` | `0` | Save every N steps (0 = only at the end). |
| `keep` | `2` | Keep the newest N checkpoints. |
| `keep_best` | `0` | Also keep the N checkpoints with the lowest eval loss (steps where an eval ran: `train.eval_every` multiples and the last). |
| `dir` | `''` | Where; `''` = `output_dir/checkpoints`. May be `gs://`. |
| `resume` | `True` | Continue from the newest checkpoint in `dir` when there is one. `False` starts afresh, and is refused when `dir` holds steps unless `overwrite`. |
| `overwrite` | `False` | With `resume=False`: move the steps already in `dir` to `DIR.overwritten-TIME` and start afresh. |

## gsm8k
GSM8K test accuracy by greedy generation (`jaxsft/evals/gsm8k.py`), before training, every
`every` steps and at the end; results in `output_dir/eval/gsm8k_step{N}.json` and the metrics sinks.
| key | default | meaning |
|---|---|---|
| `file` | `''` | GSM8K test JSONL ({question, answer}); `''` = no accuracy evaluation. |
| `subset` | `0` | Evaluate the first N problems (0 = all). |
| `k_shot` | `0` | Worked examples before each question, taken from `shots_file`. |
| `shots_file` | `''` | JSONL with the k-shot examples (the training split). |
| `max_new_tokens` | `256` | Generation budget per answer. |
| `batch_size` | `32` | Prompts generated together. |
| `every` | `0` | Also evaluate every N steps (0 = before training and at the end only). |
| `show` | `3` | At the end, print this many questions with the first and the final answers side by side. |

## lm_eval
lm-evaluation-harness tasks through the jaxsft backend (`jaxsft/evals/lm_eval_backend.py`), before
training, every `every` steps and at the end: process 0 drives lm-eval, every process joins the
model calls. Each result goes to `output_dir/eval/lm_eval_step{N}.json` (lm-eval's results JSON),
its metrics to eval.jsonl and the metrics sinks as `lm_eval/TASK/METRIC`.
`python -m jaxsft.eval --config X --tasks ...` runs the same evaluation once.
| key | default | meaning |
|---|---|---|
| `tasks` | `''` | Comma-separated lm-eval task or group names (`mmlu,gsm8k,arc_easy`); `''` = off. Tasks from the lm-eval package read their data from the Hugging Face Hub (cached); `include_path` adds tasks over local files. |
| `every` | `0` | Also evaluate every N steps (0 = before training and at the end only). |
| `limit` | `0` | Evaluate the first N documents of each task (0 = all). |
| `num_fewshot` | `-1` | Few-shot examples per prompt (-1 = each task's own default, e.g. 5 for `gsm8k`). |
| `apply_chat_template` | `False` | Render prompts with the tokenizer's chat template (few-shot examples as earlier turns). |
| `include_path` | `''` | A folder of extra lm-eval task YAMLs (`TaskManager(include_path=...)`). |
| `batch_size` | `16` | Rows per model call (log-likelihoods) and prompts generated together. |
"""

from __future__ import annotations

import ml_collections
from etils import epath

from jaxsft import rundir
from jaxsft.compile_cache import default_compile_cache_dir
from jaxsft.data import default_data_config, validate_data_config
from jaxsft.hub import HUB_ID
from jaxsft.metrics.health import ACTIONS
from jaxsft.models.gguf_export import TYPES as GGUF_TYPES
from jaxsft.models.config import ATTENTION_BACKENDS, REMAT_POLICIES, ConfigError
from jaxsft.models.lora import select_targets
from jaxsft.train.optimizer import SCHEDULES

DTYPES = ("float32", "bfloat16")
OFFLOAD_TIERS = ("none", "host", "disk")
BASE_QUANTS = ("", "nf4")
LORA_INITS = ("default", "loftq")
# Training bf16 master weights needs at least this learning rate. bf16 keeps 8 significant bits, so
# p + u rounds back to p unless |u| > half the spacing of bf16 numbers at p: 2^(e-8) for |p| in
# [2^e, 2^(e+1)). An AdamW step moves a weight by about the learning rate (|m / sqrt(v)| <= ~1).
# Weight matrices of LLMs are ~N(0, 0.02^2): 99.8% of entries lie below 2^-4 = 0.0625 (3 sigma),
# where the half-spacing is at most 2^(-5-8) = 2^-13 ~ 1.2e-4. At the recipe's 2e-5 only weights
# below 2^-7 ~ 0.008 move (~30% of them), at 1e-6 those below 2^-11 (~2%); norms (~1) need 2^-8.
BF16_MIN_LEARNING_RATE = 2.0**-13
WANDB_MODES = ("online", "offline", "disabled")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(path="", init="pretrained", param_dtype="float32", compute_dtype="bfloat16",
                   remat="full", attention="auto")
    c.data = default_data_config()
    c.optim = dict(learning_rate=2e-5, schedule="constant", warmup_steps=0, warmup_fraction=0.0,
                   final_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                   clip_norm=1.0, state_dtype="float32", offload="none", offload_dir="")
    c.train = dict(output_dir="runs/run", num_steps=0, num_epochs=1.0, seed=0, log_every=1,
                   eval_every=0, eval_at_start=True, export_hf=False, export_dtype="bfloat16", export_gguf="",
                   progress=True, stop_after_steps=0, compile_cache_dir=default_compile_cache_dir(),
                   push_to_hub="")
    c.metrics = dict(wandb=dict(project="", entity="", name="", mode="online"))
    c.health = dict(on_nan="stop", on_loss_spike="warn", on_grad_spike="warn", spike_window=20,
                    loss_spike_ratio=1.5, grad_spike_ratio=10.0)
    c.lora = dict(r=0, alpha=16.0, dropout=0.0,
                  target_modules=ml_collections.FieldReference("all-linear", field_type=object), layers=[],
                  use_rslora=False, lr_ratio=1.0, adapter_path="", base_quant="", init="default")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.checkpoint = dict(every_steps=0, keep=2, keep_best=0, dir="", resume=True, overwrite=False)
    c.gsm8k = dict(file="", subset=0, k_shot=0, shots_file="", max_new_tokens=256, batch_size=32,
                   every=0, show=3)
    c.lm_eval = dict(tasks="", every=0, limit=0, num_fewshot=-1, apply_chat_template=False, include_path="",
                     batch_size=16)
    return c


def validate(c) -> None:
    """Raises ConfigError naming the first bad key and what is allowed."""
    if "offload_state" in c.optim:
        raise ConfigError("optim.offload_state was replaced by optim.offload = 'none', 'host' or 'disk' "
                          "(offload_state=True is offload='host')")
    if c.lora.base_quant not in BASE_QUANTS:
        raise ConfigError(f"lora.base_quant={c.lora.base_quant!r}: choose one of {BASE_QUANTS}")
    if c.lora.base_quant and not (c.lora.r or c.lora.adapter_path):
        raise ConfigError(f"lora.base_quant={c.lora.base_quant!r} quantizes the frozen base of LoRA (QLoRA); full "
                          "fine-tuning (lora.r=0) trains the base weights themselves: set lora.r > 0 or base_quant=''")
    if c.lora.init not in LORA_INITS:
        raise ConfigError(f"lora.init={c.lora.init!r}: choose one of {LORA_INITS}")
    if c.lora.init == "loftq" and (c.lora.base_quant != "nf4" or c.lora.adapter_path):
        raise ConfigError("lora.init='loftq' starts fresh adapters from the NF4 base's quantization error: it needs "
                          "lora.base_quant='nf4' and no lora.adapter_path (whose adapters would replace them)")
    if c.optim.offload != "none" and (c.lora.r or c.lora.adapter_path):
        raise ConfigError("optim.offload moves full fine-tuning's master weights and moments; LoRA's are small: "
                          "set optim.offload='none'")
    if c.optim.offload == "disk" and not c.optim.offload_dir and rundir.is_gcs(c.train.output_dir):
        raise ConfigError("optim.offload='disk' keeps its live state on local disk: set optim.offload_dir "
                          "(train.output_dir is gs://)")
    choices = {
        "model.init": (c.model.init, ("pretrained", "random")),
        "model.param_dtype": (c.model.param_dtype, DTYPES),
        "model.compute_dtype": (c.model.compute_dtype, DTYPES),
        "model.remat": (c.model.remat, (*REMAT_POLICIES, "auto")),
        "model.attention": (c.model.attention, ATTENTION_BACKENDS),
        "optim.schedule": (c.optim.schedule, SCHEDULES),
        "optim.state_dtype": (c.optim.state_dtype, DTYPES),
        "optim.offload": (c.optim.offload, OFFLOAD_TIERS),
        "train.export_dtype": (c.train.export_dtype, DTYPES),
        "train.export_gguf": (c.train.export_gguf, ("", *GGUF_TYPES)),
        "metrics.wandb.mode": (c.metrics.wandb.mode, WANDB_MODES),
        **{f"health.{k}": (c.health[k], ACTIONS) for k in ("on_nan", "on_loss_spike", "on_grad_spike")},
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    if not c.model.path:
        raise ConfigError("model.path is empty: give a Hugging Face model folder, .gguf file or checkpoint")
    positive = {"optim.learning_rate": c.optim.learning_rate, "train.log_every": c.train.log_every,
                "health.spike_window": c.health.spike_window,
                "health.loss_spike_ratio": c.health.loss_spike_ratio,
                "health.grad_spike_ratio": c.health.grad_spike_ratio}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}={value!r} must be > 0")
    if c.checkpoint.overwrite and c.checkpoint.resume:
        raise ConfigError("checkpoint.overwrite=True moves old steps aside for a fresh start: set "
                          "checkpoint.resume=False with it")
    if c.optim.warmup_steps and c.optim.warmup_fraction:
        raise ConfigError("optim.warmup_steps and optim.warmup_fraction are both set; use one")
    if not 0 <= c.optim.warmup_fraction < 1:
        raise ConfigError(f"optim.warmup_fraction={c.optim.warmup_fraction} must be in [0, 1)")
    if c.optim.schedule == "constant" and (c.optim.warmup_steps or c.optim.warmup_fraction):
        raise ConfigError("optim.schedule='constant' has no warmup; use 'warmup_constant'")
    if c.train.push_to_hub and not HUB_ID.fullmatch(c.train.push_to_hub):
        raise ConfigError(f"train.push_to_hub={c.train.push_to_hub!r}: give a Hub repo id 'owner/name'")
    if c.train.push_to_hub and not c.train.export_hf:
        raise ConfigError("train.push_to_hub uploads the hf/ export: set train.export_hf=True")
    if c.train.stop_after_steps < 0:
        raise ConfigError(f"train.stop_after_steps={c.train.stop_after_steps} must be >= 0 (0 = off)")
    if c.train.num_steps < 0 or (c.train.num_steps == 0 and not c.train.num_epochs > 0):
        raise ConfigError("set train.num_steps > 0 or train.num_epochs > 0")
    for key in ("data", "fsdp", "tensor"):
        if c.mesh[key] == 0 or c.mesh[key] < -1:
            raise ConfigError(f"mesh.{key}={c.mesh[key]} must be a positive size or -1")
    g = c.gsm8k
    if g.k_shot and not g.shots_file:
        raise ConfigError(f"gsm8k.k_shot={g.k_shot} needs gsm8k.shots_file (the training split)")
    for key in ("file", "shots_file"):  # checked now, not after the model has loaded
        if g[key] and not epath.Path(g[key]).exists():
            raise ConfigError(f"gsm8k.{key}={g[key]!r}: no such file")
    for key in ("subset", "k_shot", "every", "show"):
        if g[key] < 0:
            raise ConfigError(f"gsm8k.{key}={g[key]} must be >= 0")
    for key in ("max_new_tokens", "batch_size"):
        if g[key] < 1:
            raise ConfigError(f"gsm8k.{key}={g[key]} must be >= 1")
    e = c.lm_eval
    for key, ok, rule in (("every", e.every >= 0, ">= 0"), ("limit", e.limit >= 0, ">= 0 (0 = all)"),
                          ("num_fewshot", e.num_fewshot >= -1, ">= 0, or -1 (each task's default)"),
                          ("batch_size", e.batch_size >= 1, ">= 1")):
        if not ok:
            raise ConfigError(f"lm_eval.{key}={e[key]!r} must be {rule}")
    if e.include_path and not epath.Path(e.include_path).is_dir():
        raise ConfigError(f"lm_eval.include_path={e.include_path!r}: no such folder")
    lo = c.lora
    for key, ok, rule in (("r", lo.r >= 0, ">= 0 (0 = off)"), ("alpha", lo.alpha > 0, "> 0"),
                          ("lr_ratio", lo.lr_ratio > 0, "> 0"), ("dropout", 0 <= lo.dropout < 1, "in [0, 1)")):
        if not ok:
            raise ConfigError(f"lora.{key}={lo[key]!r} must be {rule}")
    if c.model.param_dtype == "bfloat16" and c.optim.learning_rate < BF16_MIN_LEARNING_RATE and not (lo.r or lo.adapter_path):
        raise ConfigError(
            f"model.param_dtype='bfloat16' at optim.learning_rate={c.optim.learning_rate:g}: bf16 master weights "
            f"round away AdamW updates below {BF16_MIN_LEARNING_RATE:.2g}, so the weights barely move; keep "
            "model.param_dtype='float32' and save memory with optim.offload='host' (master weights and optimizer "
            "state in host memory), or train LoRA adapters (lora.r > 0) on bf16 frozen base weights")
    # The validators below live with their sections and raise ValueError: here it is a config mistake.
    try:
        if lo.r or lo.adapter_path:
            select_targets(lo.target_modules if isinstance(lo.target_modules, str) else list(lo.target_modules),
                           max([*lo.layers, 0]) + 1, tuple(lo.layers))  # the names; layer bounds need the model
        validate_data_config(c.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
