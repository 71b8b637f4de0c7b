"""Run under torchrun: every rank prepares the same data through one cache; each rank writes what it tokenized
itself and the examples it reads (or the error it raised)."""

import json
import sys

from bilora_dist.data import pipeline
from bilora_dist.data.tokenize import TokenizeOptions
from bilora_dist.model.embedded import default_model_dir
from bilora_dist.engines.distributed import DataParallelEngine
from bilora_dist.errors import UserError
from bilora_dist.model.loading import load_tokenizer

if __name__ == "__main__":
    out, data, cache = sys.argv[1:4]
    engine = DataParallelEngine()
    calls = []
    tokenize_record = pipeline.tokenize_record

    def counted(*args, **kwargs):
        calls.append(1)
        return tokenize_record(*args, **kwargs)

    pipeline.tokenize_record = counted
    result = {"rank": engine.rank}
    try:
        prepared = pipeline.prepare_examples(data, "--data", load_tokenizer(str(default_model_dir())),
                                             TokenizeOptions(64), workers=1, cache=cache, engine=engine)
        result["examples"] = [prepared.examples[i] for i in range(len(prepared.examples))]
    except UserError as exc:
        result["error"] = str(exc)
    result["tokenized"] = len(calls)
    with open(f"{out}/rank{engine.rank}.json", "w") as f:
        json.dump(result, f)
    engine.close()
