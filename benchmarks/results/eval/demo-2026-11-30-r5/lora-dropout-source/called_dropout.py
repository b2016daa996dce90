"""RoRA demo (seed 0) with the LoRA dropout drawn the old way: a dropout module the op
calls (torch's Bernoulli). mode 'global': from torch's default generator, as the library
did before 3a43c1c (must reproduce the old demo table); mode '<int>': from a dedicated
generator with that seed (the default generator then untouched by the LoRA dropout, as
in the new scheme: only the LoRA masks' source differs)."""
import sys
import torch
from torch import nn
import rora_fast
mode = sys.argv[1]
gen = None if mode == "global" else torch.Generator().manual_seed(int(mode))

class CalledDropout(nn.Dropout):
    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if gen is None:
            return nn.functional.dropout(x, self.p, True)
        keep = torch.empty(x.shape, dtype=x.dtype).bernoulli_(1 - self.p, generator=gen)
        return x * keep / (1 - self.p)

_apply = rora_fast.apply_rora
def apply_rora(model, cfg, **kw):
    out = _apply(model, cfg, **kw)
    for _, layer in rora_fast.rora_layers(out):
        if type(layer.lora_dropout) is nn.Dropout:
            layer.lora_dropout = CalledDropout(layer.lora_dropout.p)
    return out
rora_fast.apply_rora = apply_rora
from rora_fast import cli
sys.exit(cli.main(["demo", "--methods", "rora", "--out", f"runs-old-{mode}"]))
