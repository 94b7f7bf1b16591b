"""Lightning callbacks of training: ``EMAWeights`` (the EMA of fine-tuning).

Sampling's callback is ``idgen.sampling.DecoupledGuidanceSampling``; logging media to the
chosen loggers is ``idgen.utils.log_media``.
"""
