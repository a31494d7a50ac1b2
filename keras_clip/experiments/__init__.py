"""The CLIP paper's experiments at a scale that runs on a laptop (issue 18).

- `prompts`: prompt engineering and ensembling (the paper's Figure 4): class name
  alone, "A photo of a {}.", the shipped per-dataset templates, the 80 ImageNet
  templates and greedy template selection, each on the same evaluation split.
- `few_shot`: zero-shot versus k-shot linear probes on the same frozen features
  (Figures 6-7) and the number of labelled examples per class zero-shot is worth.
- `objectives`: contrastive versus predictive training objectives (Figure 2): the same
  image tower, data and budget trained four ways, zero-shot accuracy against images
  processed, and how many more images the predictive objectives need.

The command line is `python -m keras_clip.experiments NAME` (see `__main__.py`);
each writes JSON, a Markdown table and a PNG plot.
"""
