# Exploration run (predictor issue): records 16,384 calibration tokens to /tmp/rec, trains, evaluates on 4,096 held-out tokens.
# Usage: python first_run_4096_tokens.py 16384 6
import torch, time, sys
from dejavu.load import load
from dejavu.sparse import *
from dejavu.selectors import *
from dejavu.data import wiki_split
from dejavu.evaluate import token_stream, perplexity
from dejavu.collect import record
from dejavu.predictor import train, TrainSettings, Predictors
torch.manual_seed(0)
L=load(); m=L.model
N=int(sys.argv[1])
cal=token_stream(L.tokenizer, wiki_split('calibration'), N)
t=time.time(); man=record(m, cal, '/tmp/rec', progress=False); print('record', time.time()-t, man['bytes']/1e9, 'GB', flush=True)
t=time.time(); P=train(m, '/tmp/rec', TrainSettings(epochs=int(sys.argv[2])), progress=False); print('train', time.time()-t, flush=True)
P.save('/tmp/pred'); P=Predictors.load('/tmp/pred', m)
for l in (0,5,15,29): print(l, P.meta['metrics'][l])
print(P.cost(m))
held=token_stream(L.tokenizer, wiki_split('heldout'), 4096)
print('dense', perplexity(m, held, 512, progress=False).ppl, flush=True)
o=OracleSelector(m); st=StaticSelector(P.static_neuron, P.static_head); pr=PredictorSelector(P); g=GateSelector(m)
for dens in (0.5, 0.3):
  for name, sel in [('oracle',o),('static',st),('pred',pr),('gate',g)]:
    t=time.time(); r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, mlp=sel, mlp_density=dens)); print('mlp', dens, name, round(r.ppl,2), round(time.time()-t,1), flush=True)
for dens in (6/9, 5/9):
  for name, sel in [('oracle',o),('static',st),('pred',pr)]:
    r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, heads=sel, attn_density=dens)); print('attn', dens, name, round(r.ppl,2), flush=True)
