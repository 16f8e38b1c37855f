"""StyleID-style identity disentanglement on facegen's generators (Le & Carlsson, PoPETs 2023).

`metric` says how much identity and how much appearance a swap changes; `rank` scores every swap
unit of W+ or StyleSpace with it; `swap` anonymises codes by swapping the top-ranked units;
`tradeoff` measures privacy against utility over the knob n; `project` finds the W+ code of a real
photo; `photos` runs the real-image pipeline.
"""
