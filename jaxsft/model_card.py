"""The model card (README.md) of an export: what the model was fine-tuned from, on which data, with
which recipe, and how it scored, under the YAML front matter the Hugging Face Hub reads (as
`Trainer.push_to_hub` writes it). llama.cpp's converter takes the GGUF's name and base model from
it too."""

from __future__ import annotations

from importlib.metadata import version

from jaxsft.hub import is_hub_id


def data_paths(data: dict) -> list[str]:
    """Every training source's path, in the order the config lists them (both data modes)."""
    sources = list(data.get("sources") or [])
    for phase in data.get("phases") or []:
        sources += phase.get("sources") or []
    return [s if isinstance(s, str) else s["path"] for s in sources]


def model_card(config: dict, name: str, metrics: dict) -> str:
    """`config`: the run config as a dict; `metrics`: a run summary (`steps`, `loss`, `eval_loss`,
    `gsm8k_accuracy` as [(step, accuracy)]); whatever is missing is left out."""
    base = config["model"]["path"]
    lora, optim, data = config["lora"], config["optim"], config["data"]
    datasets = data_paths(data)
    front = ["---", "library_name: transformers", f"model_name: {name}"]
    if is_hub_id(base):
        front.append(f"base_model: {base}")
    hub_datasets = [d for d in datasets if is_hub_id(d)]
    if hub_datasets:
        front += ["datasets:"] + [f"- {d}" for d in hub_datasets]
    front += ["tags:", "- jaxsft", "- sft"] + (["- lora"] if lora["r"] else []) + ["---", ""]

    method = (f"LoRA (r={lora['r']}, alpha={lora['alpha']}{', rsLoRA' if lora['use_rslora'] else ''}; "
              "merged into the weights)" if lora["r"] else "full fine-tuning")
    lines = [f"# {name}", "",
             f"A {method} of `{base}` with jaxsft {version('jaxsft')}.", "",
             "## Data", ""] + [f"- `{d}`" for d in datasets] + [
             "", "## Recipe", "",
             f"- learning rate {optim['learning_rate']}, schedule {optim['schedule']}, "
             f"warmup {optim['warmup_steps'] or optim['warmup_fraction']}, weight decay {optim['weight_decay']}",
             f"- global batch {data['global_batch_size']} samples, max_seq_len {data['max_seq_len']}, "
             f"loss on {data['loss_on']}",
             f"- params {config['model']['param_dtype']}, compute {config['model']['compute_dtype']}, "
             f"seed {config['train']['seed']}"]
    results = [(label, metrics.get(key)) for label, key in
               (("steps", "steps"), ("train loss (last step)", "loss"), ("held-out loss", "eval_loss"))]
    gsm8k = metrics.get("gsm8k_accuracy") or []
    if gsm8k:
        results.append((f"GSM8K accuracy (step {gsm8k[-1][0]})", gsm8k[-1][1]))
    results = [f"- {label}: {value:.4g}" if isinstance(value, float) else f"- {label}: {value}"
               for label, value in results if value is not None]
    if results:
        lines += ["", "## Results", ""] + results
    return "\n".join(front + lines) + "\n"
