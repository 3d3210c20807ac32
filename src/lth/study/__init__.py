"""The study: IMP jobs, the transfer arms, tuning; each a resumable job over the core (training, pruning).

Import direction inside: files (files as bytes) <- step (one tracked fit-and-test) <- imp <- transfer <-
tune_tickets <- tune <- plan <- engine <- ray_engine.
"""
