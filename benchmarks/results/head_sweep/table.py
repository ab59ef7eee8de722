import sys,json,numpy as np
rows={}
for f in sys.argv[1:]:
    for l in open(f):
        if l.startswith("RESULT"):
            r=json.loads(l[7:]); rows[r["candidate"]]=np.array(r["per_seed"])
base=rows["hyper@softmax"]
print("| candidate | seeds 0-2: ZS hit@1 | ZS hit@5 (std) | noto hit@1 | noto hit@5 (std) | H cal | seeds 0-9: ZS hit@1 | ZS hit@5 (std) | noto hit@1 | noto hit@5 | H cal | paired Δ vs default, seeds 0-9 (±SE): ZS@1 / ZS@5 / noto@1 / H |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for c,a in rows.items():
    t=a[:3]; m3=t.mean(0); s3=t.std(0)
    line=f"| `{c}` | {100*m3[0]:.1f} | {100*m3[1]:.1f} ({100*s3[1]:.1f}) | {100*m3[2]:.1f} | {100*m3[3]:.1f} ({100*s3[3]:.1f}) | {100*m3[5]:.1f} |"
    if len(a)==10:
        m=a.mean(0); s=a.std(0); d=a-base; se=d.std(0,ddof=1)/np.sqrt(10)
        line+=f" {100*m[0]:.1f} | {100*m[1]:.1f} ({100*s[1]:.1f}) | {100*m[2]:.1f} | {100*m[3]:.1f} | {100*m[5]:.1f} | "
        line+=" / ".join(f"{100*d[:,i].mean():+.1f}±{100*se[i]:.1f}" for i in (0,1,2,5))+" |"
    else: line+=" – | – | – | – | – | – |"
    print(line)
