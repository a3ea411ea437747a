"""Contrastive fine-tuning of the embedder (docs/method.md §3): the training stages and their loop.

Modules, in the order a step uses them:
  stage.py          the stages `train`, `train_random` and `train_plain_random`: one function
                    (`train_stage`: which batches, which prompt, which output folder) that reads
                    the rows and clusters, binds the loop to a Qwen2VL (`train_model`: the
                    trainable / frozen split, the vision tower run once per step, the DoRA norms)
                    and saves the result (g2e.saving);
  trainer.py        the loop, top to bottom in sections: input pipeline, model and optimizer,
                    sharding and transfer, update step, checkpoint, metrics, loop (`fit(run,
                    train_cfg)`, with a `Run` holding what is trained, on what, where);
  batches.py        which rows form each step (`ClusterSchedule`, a pure function of (seed,
                    step)), row -> `Encoded` query and positive -> collated arrays (`RowCodec`),
                    and the Grain workers that do it ahead of the devices (`StepInputs`);
  step.py           the pure `train_step(setup, state, frozen, batch)`, jitted with the state
                    donated, compiled per batch shape, direct backprop or GradCache
                    (`CompiledSteps`, train.backprop);
  gradcache.py      GradCache: embed in chunks without gradients, the loss gradient with respect
                    to the embeddings, then each chunk's backward;
  loss.py           InfoNCE over the global batch, duplicates masked, sharded over the batch axes;
  optimizer.py      AdamW with linear warm-up and decay, global-norm clipping;
  checkpointing.py  Orbax checkpoints (train state + input position) and the SIGTERM flag;
  flops.py          model FLOPs of a step (MFU) and the compiled program's FLOPs (HFU).

One step: `trainer._loop` takes the batch that `_next_batch` prepared (StepInputs.prepare: the
schedule's rows, encoded by RowCodec in Grain workers and collated; StepInputs.agree: widened to
the buckets every process agreed on; distributed.put_batch: placed over the batch axes) and runs
the compiled `step.train_step`: `prepare_fn` (the frozen vision tower, the DoRA norms), then the
loss and gradients (gradcache.loss_and_grads or direct_loss_and_grads, both over
loss.infonce), then AdamW. While it runs, the next batch is prepared; the step's metrics are
fetched one step late and checked for NaN before anything evaluates or saves it; then the
held-out check, the checkpoint (with the Grain iterator state, so a resume is bitwise) and the
stop signal.
"""
