"""Evaluation: lm-evaluation-harness tasks offline, perplexity, generations, for every kind of model megadistil
makes or starts from (tools/evaluate.py, train.eval_tasks, the demo)."""

from megadistil.eval.models import EvalError, LoadedModel, ModelSpec, load_model, parse_model

__all__ = ["EvalError", "LoadedModel", "ModelSpec", "load_model", "parse_model"]
