"""WebDataset shards with broken samples: each skipped and named in one line, never a traceback."""

import io
import tarfile

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from selfsup.shards import shard_dataset


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, samples: dict[str, dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_sample_without_its_image_or_label_is_skipped_and_named(tmp_path, capfd):
    shard = write_shard(
        tmp_path / "shard-0000.tar",
        {
            "good1": {"png": png(), "cls": b"1"},
            "nolabel": {"png": png()},
            "noimage": {"cls": b"2", "txt": b"a caption"},
            "badimage": {"png": b"not a png", "cls": b"0"},
            "good2": {"png": png(), "cls": b"3"},
        },
    )
    labels = [int(label) for _, label in DataLoader(shard_dataset([shard]), batch_size=None, num_workers=1)]
    assert labels == [1, 3]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("warning: ") and shard in line for line in err), err
    assert "nolabel" in err[0] and ".cls" in err[0] and "noimage" in err[1] and "badimage" in err[2]
    assert "Traceback" not in "\n".join(err)
