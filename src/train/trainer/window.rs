//! One optimizer step: forward + backward over an accumulation window's micro-batches, then
//! unscale, clip, check for divergence or overflow, and the AdamW update.

use super::batch::{make_batch, Batch};
use super::plan::{eta_seconds, evals_from, mix};
use super::session::Session;
use super::step::micro_step;
use crate::train::data::encode::Example;
use crate::train::events::{Control, Outcome, StepMetrics, TrainEvent};
use crate::train::loss_scale;
use crate::train::optim::{clip_grad_norm, lr_at};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, TensorId};
use std::collections::HashMap;

/// One accumulation window's gradients and statistics, or how the run stopped instead.
pub(super) enum Accumulated {
    Window(Window),
    Stopped(Outcome),
}

pub(super) struct Window {
    /// Summed LoRA gradients, keyed by the Var's tensor id.
    grads: HashMap<TensorId, Tensor>,
    loss_sum: f64,
    n_targets: usize,
    /// Σ over micro-batches of their token accuracy (TRL averages them unweighted).
    accuracy_sum: f64,
    micro_batches: usize,
    tokens: usize,
    lr: f64,
}

impl Session<'_> {
    /// Forward and backward over the next window's micro-batches, polling `control` before each.
    pub(super) fn accumulate(
        &mut self,
        control: &Control,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<Accumulated> {
        let (cfg, plan) = (&self.job.config, &self.plan);
        if self.state.window_in_epoch as usize >= plan.windows_per_epoch {
            self.state.epoch += 1;
            self.state.window_in_epoch = 0;
            self.order = plan.epoch_order(self.state.epoch);
        }
        let batches: Vec<Vec<&Example>> = plan
            .window(&self.order, self.state.window_in_epoch as usize)
            .iter()
            .map(|idx| idx.iter().map(|&i| &self.train.examples[i]).collect())
            .collect();
        let n_targets: usize = batches.iter().flatten().map(|e| e.n_targets()).sum();
        let step = self.state.step;
        let lr = lr_at(
            cfg.lr_scheduler,
            cfg.learning_rate,
            step,
            plan.warmup_steps,
            plan.total_steps,
        );
        let mut w = Window {
            grads: HashMap::new(),
            loss_sum: 0.0,
            n_targets,
            accuracy_sum: 0.0,
            micro_batches: batches.len(),
            tokens: 0,
            lr,
        };
        for (m, examples) in batches.iter().enumerate() {
            control.yield_to_interlude(&self.model);
            if control.is_cancelled() {
                return Ok(Accumulated::Stopped(Outcome::Cancelled { step }));
            }
            if control.is_suspended() {
                let checkpoint = self.save(on_event)?;
                return Ok(Accumulated::Stopped(Outcome::Suspended {
                    checkpoint,
                    step,
                }));
            }
            let b = make_batch(&self.model, examples)?;
            let key = (cfg.lora.dropout > 0.0).then(|| mix(cfg.seed, step, m as u64));
            let scale = self.scaler.map_or(1.0, |s| s.scale) / n_targets as f64;
            let s = micro_step(
                &self.model,
                &b,
                scale,
                key,
                cfg.gradient_checkpointing,
                &mut w.grads,
            )?;
            if !s.loss_sum.is_finite() && self.precision.base_dtype != DType::F32 {
                self.fail_on_forward_overflow(&b, key, step)?;
            }
            w.loss_sum += s.loss_sum;
            w.accuracy_sum += s.correct as f64 / s.targets.max(1) as f64;
            w.tokens += b.n_tokens;
        }
        Ok(Accumulated::Window(w))
    }

    /// Clip, check for divergence, take the AdamW step and advance the state.
    pub(super) fn update(&mut self, mut w: Window) -> Result<StepMetrics> {
        let cfg = &self.job.config;
        let train_loss = w.loss_sum / w.n_targets.max(1) as f64;
        let mut grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|(k, v)| {
                w.grads
                    .remove(&v.id())
                    .with_context(|| format!("{k} got no gradient"))
            })
            .collect::<Result<_>>()?;
        if let (true, Some(g)) = (
            loss_scale::injected_overflow(self.state.step + 1),
            grads.first_mut(),
        ) {
            *g = g.affine(f64::INFINITY, 0.0)?;
        }
        let loss_scale = self.scaler.map(|s| s.scale);
        if let Some(s) = loss_scale {
            for g in grads.iter_mut() {
                *g = g.affine(1.0 / s, 0.0)?;
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        // With loss scaling, overflowing gradients skip the step and lower the scale; without it
        // they mean divergence.
        let step_ok = match self.scaler.as_mut() {
            Some(s) => s.update(grad_norm.is_finite()),
            None => grad_norm.is_finite(),
        };
        if !train_loss.is_finite() || (!step_ok && self.scaler.is_none()) {
            bail!(
                "training diverged at step {}: loss {train_loss}, grad norm {grad_norm}; lower the learning rate (now {})",
                self.state.step + 1,
                cfg.learning_rate
            );
        }
        if step_ok {
            self.opt.step(&grads, w.lr)?;
        }
        self.state.loss_scaler = self.scaler;

        let (plan, st) = (&self.plan, &mut self.state);
        let accuracy = w.accuracy_sum / w.micro_batches as f64;
        st.step += 1;
        st.window_in_epoch += 1;
        st.num_tokens += w.tokens as u64;
        st.last_train_loss = Some(train_loss);
        st.last_train_accuracy = Some(accuracy);
        let (start_step, start_elapsed, start_tokens) = self.start;
        let elapsed = self.clock.elapsed().as_secs_f64();
        st.elapsed_seconds = start_elapsed + elapsed;
        let micro_done = (st.window_in_epoch as usize * plan.accum).min(plan.micro_per_epoch);
        // Evaluations are timed apart from training steps, so that the ones still to come count
        // at their own cost (the tool-call evaluation can cost more than many steps).
        let evaluates = self.val.is_some() || self.tool_eval.is_some();
        let evals_left = if evaluates {
            evals_from(st.step, plan.total_steps, cfg.eval_steps)
        } else {
            0
        };
        let train_seconds = (elapsed - self.eval_seconds).max(0.0);
        let eta = eta_seconds(
            train_seconds / (st.step - start_step) as f64,
            plan.total_steps - st.step,
            evals_left,
            st.last_eval_seconds.unwrap_or(0.0),
        );
        Ok(StepMetrics {
            step: st.step,
            total_steps: plan.total_steps,
            epoch: st.epoch as f64 + micro_done as f64 / plan.micro_per_epoch as f64,
            train_loss,
            learning_rate: w.lr,
            grad_norm,
            train_mean_token_accuracy: accuracy,
            num_tokens: st.num_tokens,
            tokens_per_second: (st.num_tokens - start_tokens) as f64 / elapsed.max(1e-9),
            elapsed_seconds: st.elapsed_seconds,
            eta_seconds: eta,
            loss_scale,
            skipped_steps: self.scaler.map_or(0, |s| s.skipped_steps),
        })
    }

    /// A non-finite loss under f16/bf16 base weights: replays the micro-batch's forward pass,
    /// checking every projection's GEMM output, and fails naming the first that overflowed. Loss
    /// scaling cannot help there (the forward pass is not scaled), so torch's scaler would
    /// only skip steps and shrink the scale forever. Without an overflowing projection, returns
    /// and the step fails as a divergence.
    fn fail_on_forward_overflow(&self, b: &Batch, key: Option<u64>, step: u64) -> Result<()> {
        if let Some(name) =
            crate::train::model::overflow::locate_overflow(&self.model, &b.packed, key)?
        {
            let dtype = self.precision.name();
            let fix = if dtype == "f16" {
                "use precision f32 or bf16"
            } else {
                "use precision f32"
            };
            bail!(
                "{dtype} overflow in {name} output at step {}; {fix}",
                step + 1
            );
        }
        Ok(())
    }
}
