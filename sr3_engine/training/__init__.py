"""The training layer: reproducible data (`data`), killable checkpoints (`checkpoint`) and the
training loop (`trainer`); the command around it is `cli/train.py`."""
