# Exploration run (predictor issue): needs a recording at /tmp/rec and predictors at /tmp/pred made by
# dejavu.collect.record / predictor.train (16,384 calibration tokens). Output: docs/experiments/*.log
import torch, time, sys
import torch.nn.functional as F
from dejavu.load import load
from dejavu.sparse import *
from dejavu.data import wiki_split
from dejavu.evaluate import token_stream, perplexity
from dejavu.collect import load_layer, read_manifest, split_shards
from dejavu.predictor import LowRank, _fit, top_set
L=load(); m=L.model; cfg=m.cfg
held=token_stream(L.tokenizer, wiki_split('heldout'), 4096)
man=read_manifest('/tmp/rec'); tr_s, ho_s = split_shards(man['shards'])
data=[load_layer('/tmp/rec', sorted({f'resid.{l}', f'resid.{max(l-1,0)}', f'head.{l}'}), list(tr_s)+list(ho_s)) for l in range(cfg.n_layers)]
class Sel:
    def __init__(s, nets, la): s.nets, s.la = nets, la
    def head_scores(s, layer, resid, x_in, y):
        src = max(layer-1,0) if s.la else layer
        return s.nets[layer](resid[src]).view(y.shape[:-1])
def variant(rank, epochs, la, loss, lr=2e-3):
    g=torch.Generator().manual_seed(0); torch.manual_seed(0); nets=[]
    for l in range(cfg.n_layers):
        d=data[l]; x=d[f'resid.{max(l-1,0)}' if la else f'resid.{l}']; imp=d[f'head.{l}']
        net=LowRank(cfg.d_model, rank, cfg.n_heads, True)
        if loss=='mse': t=torch.log(imp+1e-4); fn=lambda o,i: F.mse_loss(o,t[i])
        elif loss=='listwise': t=torch.softmax(torch.log(imp+1e-4)*2,-1); fn=lambda o,i: -(t[i]*torch.log_softmax(o,-1)).sum(-1).mean()
        elif loss=='bce': t=top_set(imp,6).float(); fn=lambda o,i: F.binary_cross_entropy_with_logits(o,t[i])
        _fit(net, x, fn, epochs, 256, lr, g); nets.append(net.eval())
    return Sel(nets, la)
for name,args in [('r72-e6-la-mse',(72,6,True,'mse')),('r144-e12-la-mse',(144,12,True,'mse')),('r72-e6-same-mse',(72,6,False,'mse')),('r72-e6-la-listwise',(72,6,True,'listwise')),('r72-e6-la-bce',(72,6,True,'bce'))]:
    t=time.time(); sel=variant(*args); tt=time.time()-t
    for dens in (6/9,5/9):
        r=perplexity(m, held, 512, progress=False, sparsity=Masked(m, heads=sel, attn_density=dens)); print('attn', name, round(dens,3), round(r.ppl,2), 'train', round(tt,1), flush=True)
