# Exploration run (predictor issue): needs a recording at /tmp/rec and predictors at /tmp/pred made by
# dejavu.collect.record / predictor.train (16,384 calibration tokens). Output: docs/experiments/*.log
import torch, time, sys
from dejavu.load import load
from dejavu.sparse import *
from dejavu.selectors import *
from dejavu.data import wiki_split
from dejavu.evaluate import token_stream, perplexity
from dejavu.collect import record
from dejavu.predictor import train, TrainSettings, Predictors
L=load(); m=L.model
cal=token_stream(L.tokenizer, wiki_split('calibration'), 49152)
t=time.time(); record(m, cal, '/tmp/rec48', progress=False); print('record', time.time()-t, flush=True)
t=time.time(); P=train(m, '/tmp/rec48', TrainSettings(epochs=6), progress=False); print('train', time.time()-t, flush=True)
P.save('/tmp/pred48')
held=token_stream(L.tokenizer, wiki_split('heldout'), 4096)
pr=PredictorSelector(P)
for dens in (6/9, 5/9):
    r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, heads=pr, attn_density=dens)); print('attn', dens, round(r.ppl,2), flush=True)
    r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, heads=pr, attn_density=P.allocation('attn', dens))); print('attn alloc', dens, round(r.ppl,2), flush=True)
    o=OracleSelector(m)
    r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, heads=o, attn_density=P.allocation('attn', dens))); print('attn oracle alloc', dens, round(r.ppl,2), flush=True)
r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, mlp=pr, mlp_density=0.5)); print('mlp pred 0.5', round(r.ppl,2), flush=True)
g=GateSelector(m)
r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, mlp=g, mlp_density=P.allocation('mlp',0.5))); print('mlp gate alloc 0.5', round(r.ppl,2), flush=True)
r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, mlp=g, mlp_density=P.allocation('mlp',0.3))); print('mlp gate alloc 0.3', round(r.ppl,2), flush=True)
print(P.allocation('mlp',0.5)); print(P.allocation('attn',6/9))
