import sys,json,numpy as np
rows=[]
for f in sys.argv[1:]:
    for l in open(f):
        if l.startswith("RESULT"): rows.append(json.loads(l[7:]))
base=None
for r in rows:
    a=np.array(r["per_seed"])
    if base is None or r["candidate"]=="hyper@softmax" and len(a)==len(base): 
        if r["candidate"]=="hyper@softmax": base=a
for r in rows:
    a=np.array(r["per_seed"]); n=len(a)
    m=a.mean(0)
    s=f"{r['candidate']:42s} n={n} zs1 {m[0]:.3f} zs5 {m[1]:.3f}±{a[:,1].std():.3f} noto1 {m[2]:.3f} noto5 {m[3]:.3f}±{a[:,3].std():.3f} Hcal {m[5]:.3f} ep {m[8]:.1f}"
    if base is not None and len(base)==n:
        d=a-base; se=d.std(0,ddof=1)/np.sqrt(n) if n>1 else d[0]*0
        s+=" | d: "+" ".join(f"{k} {d[:,i].mean():+.3f}({se[i]:.3f})" for i,k in [(0,'zs1'),(1,'zs5'),(2,'noto1'),(3,'noto5'),(5,'H')])
    print(s)
