"""Input-side sparsity on SmolLM2 (CPU): uniform densities against TEAL's block-wise greedy
allocation (sparse.allocate_input_densities) at the same share of weights read: perplexity on
2048 held-out tokens, thresholds set on 2048 calibration tokens (the greedy on the first 1024).

    PYTHONPATH=src python scripts/input_allocation.py
"""
import time, torch
from dejavu.load import load
from dejavu.evaluate import text_stream, perplexity
from dejavu.selectors import InputSelector, weights_read_fraction
from dejavu.sparse import InputSparsity, calibrate_thresholds, allocate_input_densities, INPUT_GROUPS
m = load("smollm2-135m"); model, tok = m.model, m.tokenizer
calib = text_stream(tok, None, "calibration", 2048).view(4, 512)
held = text_stream(tok, None, "heldout", 2048)
sel = InputSelector(model, "teal")
torch.set_grad_enabled(False)
for d in (0.7, 0.6):
    t = time.time()
    alloc = allocate_input_densities(model, sel, calib[:2], d)
    ta = time.time() - t
    for name, dens in (("uniform", d), ("allocated", alloc)):
        sp = InputSparsity(model, sel, calibrate_thresholds(model, sel, calib, dens))
        ppl = perplexity(model, held, 512, sparsity=sp, progress=False).ppl
        kept = {g: sp.density(g) for g in INPUT_GROUPS}
        print(f"{d} {name:<9} ppl {ppl:.2f} reads {weights_read_fraction(model, input_density=kept):.3f} kept {kept} (alloc {ta:.0f}s)", flush=True)
    print([{g: round(v, 2) for g, v in a.items()} for a in alloc[:3]], alloc[-1])
