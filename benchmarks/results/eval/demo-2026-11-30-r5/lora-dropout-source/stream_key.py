"""RoRA demo (seed 0) with the LoRA input mask keyed by another stream constant: only the
LoRA dropout masks change (the weight masks, data, init and poisoned model are the same)."""
import sys
from rora_fast import reference as ref
const = int(sys.argv[1], 16)
ref.LORA_STREAM = const
from rora_fast import cli
sys.exit(cli.main(["demo", "--methods", "rora", "--out", f"runs-stream-{sys.argv[1]}"]))
