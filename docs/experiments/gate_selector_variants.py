# Exploration run (predictor issue): needs a recording at /tmp/rec and predictors at /tmp/pred made by
# dejavu.collect.record / predictor.train (16,384 calibration tokens). Output: docs/experiments/*.log
import torch, time, sys
from dejavu.load import load
from dejavu.sparse import *
from dejavu.selectors import *
from dejavu.data import wiki_split
from dejavu.evaluate import token_stream, perplexity
from dejavu.predictor import Predictors
L=load(); m=L.model
held=token_stream(L.tokenizer, wiki_split('heldout'), 4096)
P=Predictors.load('/tmp/pred', m)
for dens in (0.5, 0.3):
  for name, sel in [('gate-only', GateSelector(m, 0, None)), ('gate-svd128', GateSelector(m, 128, None)), ('gate-refine1.25', GateSelector(m, 0, 1.25)),('gate-refine1.5', GateSelector(m, 0, 1.5)), ('gate-svd64-refine1.25', GateSelector(m, 64, 1.25))]:
    t=time.time(); r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, mlp=sel, mlp_density=dens)); print('mlp', dens, name, round(r.ppl,2), 'bytes', round(sel.mlp_bytes_fraction(dens),3), round(time.time()-t,1), flush=True)
