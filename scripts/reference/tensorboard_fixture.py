"""Write tests/fixtures/tensorboard/events.bin with TensorBoard's own protobufs and record writer: the bytes
loratune's event writer (src/train/tensorboard.rs) must reproduce exactly.

    python scripts/reference/tensorboard_fixture.py   # needs `pip install tensorboard` (2.21 used)
"""
import io
import os

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "tests", "fixtures", "tensorboard", "events.bin")

buf = io.BytesIO()
w = RecordWriter(buf)
w.write(event_pb2.Event(wall_time=1_700_000_000.25, file_version="brain.Event:2").SerializeToString())
w.write(event_pb2.Event(wall_time=1_700_000_001.5, step=20,
                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)).SerializeToString())
summary = summary_pb2.Summary(value=[
    summary_pb2.Summary.Value(tag="train/loss", simple_value=2.5),
    summary_pb2.Summary.Value(tag="train/learning_rate", simple_value=1e-4),
])
w.write(event_pb2.Event(wall_time=1_700_000_002.75, step=300, summary=summary).SerializeToString())
os.makedirs(os.path.dirname(OUT), exist_ok=True)
with open(OUT, "wb") as f:
    f.write(buf.getvalue())
print(f"wrote {OUT} ({len(buf.getvalue())} bytes)")
