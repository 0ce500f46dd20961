"""A jaxsft model backend for lm-evaluation-harness: `python -m jaxsft.eval --tasks ...`, the in-loop
`lm_eval` eval and `lm_eval.simple_evaluate(model="jaxsft", ...)`.

`JaxsftLM` (registered as `jaxsft`) answers lm-eval's three request types as its `hf` backend
does, token for token: the same tokenization (context/continuation split, BOS handling, rolling
windows), the same log-likelihoods (float32 log-softmax, right-padded batches) and greedy
generation through `jaxsft.generate` with lm-eval's stop strings. Batches are sorted by length and
padded to a few bucket shapes (`batch_size` rows, lengths rounded up to powers of two), so a task
compiles a handful of times.

In a multi-process job, process 0 drives lm-eval and every other process runs `ModelCalls.serve`:
each model call's inputs are broadcast from process 0, and every process runs the same jitted
computation on the global mesh.
"""

from __future__ import annotations

import contextlib
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text

from jaxsft import rundir
from jaxsft.generation import generate
from jaxsft.train.loss import loss_chunk

SAMPLING_ARGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def _bucket(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


@jax.jit
def _token_scores(model, ids, targets):
    """Each position's float32 log-probability of its target token, and whether it is the argmax.
    The logits are made one sequence chunk at a time, as in the loss (`loss_chunk`), so a 128k
    vocabulary never materialises (rows, length, vocab) in float32 (16 rows of 2048: 16 GiB)."""
    hidden = model.hidden_states(ids)
    rows, length, _ = hidden.shape
    chunk = loss_chunk(rows, length, model.config.vocab_size, jax.device_count())
    while length % chunk:  # lengths are powers of two here; any other is scored in smaller chunks
        chunk -= 1

    def score(xs):
        h, t = xs
        logits = model.logits(h)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), t[..., None], axis=-1)[..., 0]
        return picked, jnp.argmax(logits, axis=-1) == t

    def chunks(x):
        return jnp.moveaxis(x.reshape(rows, length // chunk, chunk, *x.shape[2:]), 1, 0)

    picked, top = jax.lax.map(score, (chunks(hidden), chunks(targets)))
    return jnp.moveaxis(picked, 0, 1).reshape(rows, length), jnp.moveaxis(top, 0, 1).reshape(rows, length)


class ModelCalls:
    """The model computations, run on every process (the mesh may span several): process 0 calls
    `scores`/`generate`, the others `serve()` until process 0 calls `stop()`."""

    def __init__(self, model, tokenizer, mesh=None):
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.collective = jax.process_count() > 1

    def _broadcast(self, op: str, args) -> None:
        if self.collective:
            payload = np.frombuffer(pickle.dumps((op, args)), np.uint8)
            multihost_utils.broadcast_one_to_all(np.int64(payload.size))
            multihost_utils.broadcast_one_to_all(payload)

    def _receive(self):
        size = int(multihost_utils.broadcast_one_to_all(np.int64(0)))
        return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(size, np.uint8))).tobytes())

    def _run(self, op: str, args):
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if op == "scores":
                ids, targets = (self._replicated(a) for a in args)
                return tuple(np.asarray(jax.device_get(x)) for x in
                             _token_scores(self.model, ids, targets))
            prompts, max_new_tokens, kwargs = args
            return generate(self.model, prompts, max_new_tokens, tokenizer=self.tokenizer, **kwargs)

    def _replicated(self, x: np.ndarray):
        if not self.collective:
            return x
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    def scores(self, ids: np.ndarray, targets: np.ndarray):
        self._broadcast("scores", (ids, targets))
        return self._run("scores", (ids, targets))

    def generate(self, prompts, max_new_tokens, **kwargs):
        self._broadcast("generate", (prompts, max_new_tokens, kwargs))
        return self._run("generate", (prompts, max_new_tokens, kwargs))

    def stop(self) -> None:
        self._broadcast("stop", None)

    def serve(self) -> None:
        """Processes other than 0: run every call process 0 makes, until it stops."""
        while True:
            op, args = self._receive()
            if op == "stop":
                return
            self._run(op, args)


def load_for_eval(source: str, mesh, compute_dtype=jnp.bfloat16, adapter: str | None = None):
    """(model, tokenizer) of any source: what `jaxsft.load_model` reads (with a PEFT `adapter`
    merged in), or a training run, checkpoint directory or step (a LoRA run's adapters merged into
    its base, as its export does)."""
    from jaxsft.export import find_params, lora_checkpoint_model, training_checkpoint_model
    from jaxsft.models import load_model, load_tokenizer, peft_io
    from jaxsft.models.converted import restore_params

    try:
        params_dir, record = find_params(source)
    except FileNotFoundError:  # not a jaxsft checkpoint
        record = None
    if record is None:
        model = load_model(source, compute_dtype=compute_dtype, mesh=mesh, lora_adapter=adapter)
        return (model if adapter is None else peft_io.merged(model)), load_tokenizer(source)
    config, tokenizer_dir = training_checkpoint_model(params_dir, record)
    if "base_model" in record:
        model = peft_io.merged(lora_checkpoint_model(params_dir, record, mesh)[0])
        model.compute_dtype = compute_dtype
    else:
        model = restore_params(params_dir, config, jnp.float32, compute_dtype, mesh=mesh)
    return model, load_tokenizer(tokenizer_dir)


@register_model("jaxsft")
class JaxsftLM(TemplateLM):
    """lm-eval's LM interface over a jaxsft model.

    From `simple_evaluate(model="jaxsft", model_args="pretrained=SOURCE,...")`:
    SOURCE is anything `jaxsft.load_model` reads, a training run, its checkpoint directory or step
    (a LoRA run's adapters are applied to its base), with optional `adapter=` (a PEFT LoRA
    folder), `compute_dtype=` (default bfloat16), `batch_size=`, `max_length=`, `max_gen_toks=`,
    `add_bos_token=`. In code: `JaxsftLM(calls=ModelCalls(model, tokenizer, mesh))`.
    """

    def __init__(self, pretrained: str | None = None, *, calls: ModelCalls | None = None, adapter: str | None = None,
                 compute_dtype: str = "bfloat16", batch_size: int | str | None = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, **ignored):
        super().__init__()
        if calls is None:
            if pretrained is None:
                raise ValueError("JaxsftLM needs pretrained= (a model source or training run) or calls=")
            from jaxsft.sharding import make_mesh

            mesh = make_mesh()
            model, tokenizer = load_for_eval(pretrained, mesh, jnp.dtype(compute_dtype), adapter)
            calls = ModelCalls(model, tokenizer, mesh)
        ignored = {k: v for k, v in ignored.items() if v is not None and k not in ("device", "max_batch_size")}
        if ignored:
            raise ValueError(f"JaxsftLM: unknown arguments {sorted(ignored)}")
        self.calls = calls
        self.tokenizer = calls.tokenizer
        self.batch_size = int(batch_size) if batch_size not in (None, "auto") else 16
        self.max_length = int(max_length or calls.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in ("1", "true")

    # --- tokenization (as lm-eval's hf backend) ---

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            flag = False
        return self.tokenizer.encode(string, **({} if flag is None else {"add_special_tokens": flag}))

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # --- log-likelihoods ---

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) for each
        (strings, context ids, continuation ids), the sequence cut from the left to max_length + 1."""
        seqs = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        conts = [len(cont) for _, _, cont in requests]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        results = [None] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = _bucket(max(len(seqs[i]) - 1 for i in chunk))
            ids = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            for row, i in enumerate(chunk):
                ids[row, :len(seqs[i]) - 1] = seqs[i][:-1]
                targets[row, :len(seqs[i]) - 1] = seqs[i][1:]
            picked, greedy = self.calls.scores(ids, targets)
            for row, i in enumerate(chunk):
                end = len(seqs[i]) - 1
                span = slice(end - conts[i], end)
                results[i] = (float(picked[row, span].astype(np.float64).sum()), bool(greedy[row, span].all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over disjoint windows of max_length tokens, as lm-eval's hf."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *lm_utils.make_disjoint_window(window)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        return totals

    # --- generation ---

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation up to the first of `until` (and the eos token), at most
        max_gen_toks tokens; greedy unless the request's generation arguments sample."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results = [None] * len(requests)
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        for indices in groups.values():
            kwargs = dict(normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            do_sample = kwargs.pop("do_sample", False)
            unknown = set(kwargs) - set(SAMPLING_ARGS)
            if unknown:
                raise ValueError(f"generation arguments jaxsft does not know: {sorted(unknown)}")
            sampling = {k: kwargs[k] for k in SAMPLING_ARGS if k in kwargs}
            if not do_sample:
                sampling["temperature"] = 0.0
            contexts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in indices}
            order = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                outputs = self.calls.generate([contexts[i] for i in chunk], max_new, stop_strings=until,
                                              eos_token_id=self._eos_ids(), **sampling)
                for i, tokens in zip(chunk, outputs):
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    results[i] = postprocess_generated_text(text, until, None)
        return results

    def _eos_ids(self) -> list[int]:
        """The tokens transformers' generate stops at: the generation config's eos ids, else the model's."""
        c = self.calls.model.config
        value = c.hf_generation_config.get("eos_token_id", c.eos_token_id)
        return [] if value is None else [value] if isinstance(value, int) else list(value)


def run_tasks(settings, calls: ModelCalls) -> dict | None:
    """lm-eval's `simple_evaluate` of the tasks in `settings` (a config's `lm_eval` section) on
    process 0, which returns its results; the other processes serve its model calls and return None."""
    if jax.process_index() != 0:
        calls.serve()
        return None
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    try:
        return simple_evaluate(
            model=JaxsftLM(calls=calls, batch_size=settings.batch_size),
            tasks=[t.strip() for t in settings.tasks.split(",") if t.strip()],
            num_fewshot=None if settings.num_fewshot < 0 else settings.num_fewshot,
            limit=settings.limit or None, task_manager=TaskManager(include_path=settings.include_path or None),
            apply_chat_template=settings.apply_chat_template, fewshot_as_multiturn=settings.apply_chat_template,
            log_samples=False)
    finally:
        calls.stop()


def figures(results: dict) -> dict[str, float]:
    """Every task's metrics as `lm_eval/TASK/METRIC` numbers (`acc`, `exact_match/strict-match`;
    no standard errors), for eval.jsonl and the metrics sinks."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            is_metric = "_stderr" not in key and key != "sample_len"  # sample_len: the documents evaluated
            if isinstance(value, (int, float)) and not isinstance(value, bool) and is_metric:
                out[f"lm_eval/{task}/{key.removesuffix(',none').replace(',', '/')}"] = float(value)
    return out


def summary(results: dict) -> str:
    """One line: each task's metrics."""
    per_task = {}
    for name, value in figures(results).items():
        _, task, metric = name.split("/", 2)
        per_task.setdefault(task, []).append(f"{metric} {value:.4f}")
    return "lm-eval: " + "; ".join(f"{task} {', '.join(m)}" for task, m in per_task.items())


def write_results(results: dict, path: str) -> None:
    """lm-eval's results JSON (as its own CLI writes it, without per-sample logs), local or gs://."""
    rundir.write_text(path, json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2,
                              default=lm_utils.handle_non_serializable, ensure_ascii=False))
