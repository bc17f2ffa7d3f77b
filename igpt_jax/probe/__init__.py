"""The linear probe's machinery, below the probe evaluator (evaluators/kinds/probe.py):

- features.py  one forward pass over a split: each chosen layer's mean-pooled features (and raw pixels, the baseline)
- cache.py     those features kept under the workdir (tensorstore), so every solver reads them and no probe of the
               same checkpoint runs the model twice
- linear.py    logistic regression on the device by full-batch L-BFGS, every layer at once; L2 chosen on held-out
               train; modal votes over masks; low-data subsets
- streamed.py  the same regression by minibatch SGD over streamed features, memory flat in the number of images
- protocol.py  the protocol that ties them together: which features, which solver, the baselines, concatenated
               layers and low-data probes, probe.json's record
"""
