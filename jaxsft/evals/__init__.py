"""Evaluations of generated answers."""

from jaxsft.evals.gsm8k import evaluate_gsm8k, flexible_answer, load_jsonl, strict_answer, write_results

__all__ = ["evaluate_gsm8k", "flexible_answer", "load_jsonl", "strict_answer", "write_results"]
