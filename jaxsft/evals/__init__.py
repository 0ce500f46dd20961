"""Evaluations of generated answers."""

from jaxsft.evals.gsm8k import evaluate_gsm8k, extract_answer, load_jsonl, write_results

__all__ = ["evaluate_gsm8k", "extract_answer", "load_jsonl", "write_results"]
