"""The local lm-eval tasks of tests/test_lm_eval.py and tools/make_lm_eval_fixtures.py (one definition
for both: the fixtures are lm-eval's hf backend on exactly these tasks). lm-eval reads them as task
config dicts with `dataset_path: json` over the JSONL files in tests/fixtures/lm_eval: no network."""
import pathlib

DATA = pathlib.Path(__file__).resolve().parent / "fixtures" / "lm_eval"
MAX_LENGTH = 64  # both backends' max_length: the long documents are truncated / windowed
# output type -> (metric, aggregation, higher is better)
METRICS = {"multiple_choice": [("acc", "mean", True), ("acc_norm", "mean", True)],
           "loglikelihood": [("perplexity", "perplexity", False), ("acc", "mean", True)],
           "generate_until": [("exact_match", "mean", True)],
           "loglikelihood_rolling": [("word_perplexity", "weighted_perplexity", False),
                                     ("byte_perplexity", "weighted_perplexity", False),
                                     ("bits_per_byte", "bits_per_byte", False)]}


def task(name: str, output_type: str, **fields) -> dict:
    return {"task": f"jaxgen_{name}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(DATA / f"{name}.jsonl")}}, "test_split": "test",
            "output_type": output_type, **fields,
            "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": h} for m, a, h in METRICS[output_type]]}


def configs() -> list[dict]:
    return [
        task("mc", "multiple_choice", doc_to_text="Question: {{question}}\nAnswer:", doc_to_choice="{{choices}}",
             doc_to_target="{{answer}}"),
        task("ll", "loglikelihood", doc_to_text="{{context}}", doc_to_target="{{' ' + target}}"),
        task("gen", "generate_until", doc_to_text="Q: {{question}}\nA:", doc_to_target="{{answer}}",
             generation_kwargs={"until": ["\n", "."], "max_gen_toks": 16, "do_sample": False}),
        task("ppl", "loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}"),
    ]
