"""Sharding under torch.distributed: 2 gloo processes on the CPU give the single-process records."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest_eval import FIXTURES, one_thread, tiny_model
from sstmerge.eval import evaluate_mmlu, evaluate_refusal, load_items

_one_thread = one_thread()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, tok = tiny_model()
        items = load_items("mmlu", FIXTURES / "mmlu_test.jsonl")
        prompts = load_items("over-refusal", FIXTURES / "xstest.csv") + load_items("refusal", FIXTURES / "advbench.csv")
        mmlu = evaluate_mmlu(model, tok, items, batch_size=4)
        ref = evaluate_refusal(model, tok, [p["prompt"] for p in prompts], max_new_tokens=8, batch_size=4)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"mmlu": mmlu, "refusal": ref}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_single_process(tmp_path):
    # fork: the workers inherit the imported torch/transformers (spawn re-imports them, ~10 s on 2 cores);
    # each worker sets 1 thread before any parallel region, so no OpenMP pool state crosses the fork
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    model, tok = tiny_model()
    items = load_items("mmlu", FIXTURES / "mmlu_test.jsonl")
    prompts = load_items("over-refusal", FIXTURES / "xstest.csv") + load_items("refusal", FIXTURES / "advbench.csv")
    mmlu = json.loads(json.dumps(evaluate_mmlu(model, tok, items, batch_size=4)))
    ref = json.loads(json.dumps(evaluate_refusal(model, tok, [p["prompt"] for p in prompts], max_new_tokens=8, batch_size=4)))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["refusal"] == ref  # generations, ids, judgements: identical, in item order
        assert len(got["mmlu"]) == len(mmlu) == 22
        for g, w in zip(got["mmlu"], mmlu):
            assert {k: v for k, v in g.items() if k != "logprobs"} == {k: v for k, v in w.items() if k != "logprobs"}
            assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-5)
