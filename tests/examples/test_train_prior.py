"""examples/train_prior.py: a short run learns class-conditional codes from CodesDataset and
writes a decoded sample grid."""
import importlib.util
import pathlib
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from codes_output import output_metadata, save_tiny_model
from pipelines import output_format as fmt

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "train_prior.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_prior", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_class_codes(out, model, classes=4, per_class=24):
    """Class c's images are all code (3c + position) % K: learnable only through the class."""
    h, w = model.grid
    k = model.codebook_size
    meta = output_metadata(model)
    schema = fmt.data_schema(meta, [pa.field("cls", pa.int64())])
    for shard in range(2):
        rows = [(c, i) for c in range(classes) for i in range(per_class // 2)]
        table = pa.table({"key": [f"{shard}-{c}-{i}" for c, i in rows], "shard": [str(shard)] * len(rows),
                          "codes": [[(3 * c + t) % k for t in range(h * w)] for c, _ in rows],
                          "cls": [c for c, _ in rows]}, schema=schema)
        pq.write_table(table, fmt.data_path(str(out), f"shard-{shard}"), row_group_size=16)
    (out / "_SUCCESS").touch()


def run_example(tmp_path):
    return load_example().main([
        "--codes", str(tmp_path / "codes"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "prior"),
        "--steps", "120", "--batch-size", "16", "--lr", "3e-3", "--d-model", "32", "--layers", "2",
        "--heads", "2", "--dropout", "0", "--workers", "1", "--samples-per-class", "3",
        "--temperature", "0.5", "--log-every", "20"])


def test_short_run_learns_class_conditional_codes(tmp_path):
    model = save_tiny_model(tmp_path / "tok")
    (tmp_path / "codes").mkdir()
    write_class_codes(tmp_path / "codes", model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny matmuls: one thread avoids contention on a shared 2-core box
    try:
        result = run_example(tmp_path)
    finally:
        torch.set_num_threads(threads)
    losses = result["losses"]
    assert losses[-1] < 0.2 * losses[0]
    h, w = model.grid
    codes = result["codes"]
    assert tuple(codes.shape) == (4 * 3, h, w)
    expected = torch.stack([torch.tensor([(3 * c + t) % 16 for t in range(h * w)]).reshape(h, w)
                            for c in range(4) for _ in range(3)])
    assert (codes == expected).float().mean() > 0.9               # samples follow their class
    with Image.open(result["samples_png"]) as img:     # a row per class, tiles >= 64 px, 2 px apart
        side = model.config.resolution * -(-64 // model.config.resolution)
        assert img.size == (3 * (side + 2) + 2, 4 * (side + 2) + 2)
    state = torch.load(result["prior"], weights_only=True)
    assert state["config"]["num_classes"] == 4
