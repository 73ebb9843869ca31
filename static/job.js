// One job's live page (#/jobs/{id}): status, the loss chart, progress stats, results, checkpoints,
// settings, the event log (fed by the job's event stream) and the playground.
import { api, jobPath } from './api.js';
import { lossChart } from './chart.js';
import { h, badge, twoStep } from './dom.js';
import { fmtNum, fmtLR, fmtCount, fmtRate, fmtDuration, fmtBytes, fmtTime, fmtPct, toDate, DASH } from './format.js';
import { playgroundCard } from './playground.js';
import { checkpointsCard, resultsCard } from './results.js';
import { RunSeries } from './series.js';
import { followEvents } from './stream.js';
import { TERMINAL } from './vocabulary.js';

const MAX_LOG = 1000;
const STREAM_TEXT = { connecting: 'connecting…', live: 'live', reconnecting: 'reconnecting…', disconnected: 'disconnected — retrying', complete: 'complete' };

function statsRow(label, testid, hidden = false) {
  const dd = h('dd', { 'data-testid': testid }, DASH);
  const nodes = [h('dt', { hidden }, label), dd];
  dd.hidden = hidden;
  return { nodes, dd, show(on) { for (const n of nodes) n.hidden = !on; } };
}

export function jobView(root, id) {
  const series = new RunSeries();
  const st = { alive: true, job: null, streamStatus: null, pollTimer: null, resultsTimer: null, resultsTries: 0, missing: false };

  // --- layout
  const statusSlot = h('span', { 'data-testid': 'job-status', 'aria-live': 'polite' }, badge('loading'));
  const cancelBtn = twoStep('Cancel job', 'Confirm cancel', async () => {
    try {
      await api(`${jobPath(id)}/cancel`, { method: 'POST' });
      addLog({ kind: 'log', level: 'info', message: 'cancellation requested' });
      refreshJob();
    } catch (e) { addLog({ kind: 'log', level: 'error', message: `cancel failed: ${e.message}` }); }
  }, { 'data-testid': 'job-cancel', hidden: true });
  const streamState = h('span', { class: 'streamstate', 'data-testid': 'stream-state', 'data-state': 'connecting', 'aria-live': 'polite' }, STREAM_TEXT.connecting);
  const modelLine = h('span', { class: 'muted mono', 'data-testid': 'job-model' });
  root.append(h('div', { class: 'pagehead' },
    h('a', { href: '#/', 'aria-label': 'Back to jobs' }, '← Jobs'), h('h1', {}, h('span', { class: 'mono', 'data-testid': 'job-id' }, id)),
    statusSlot, modelLine, h('span', { class: 'spacer' }), streamState, cancelBtn));
  const errorBanner = h('div', { class: 'formerror', role: 'alert', 'data-testid': 'job-error' });

  const chart = lossChart(series, { onDraw: (cols) => { updateStats(cols); updateTitle(); } });
  const rows = {
    step: statsRow('Step', 'stat-step'), epoch: statsRow('Epoch', 'stat-epoch'),
    loss: statsRow('Train loss', 'stat-loss'), smooth: statsRow('Smoothed', 'stat-smoothed'),
    eval: statsRow('Eval loss', 'stat-eval'), acc: statsRow('Token accuracy', 'stat-accuracy'),
    toolName: statsRow('Tool name accuracy', 'stat-tool-name', true),
    lr: statsRow('Learning rate', 'stat-lr'), tps: statsRow('Throughput', 'stat-tps'),
    tokens: statsRow('Tokens seen', 'stat-tokens'), elapsed: statsRow('Elapsed', 'stat-elapsed'),
    eta: statsRow('ETA', 'stat-eta'),
    lossScale: statsRow('Loss scale', 'stat-loss-scale', true),
    skipped: statsRow('Skipped steps', 'stat-skipped-steps', true),
    memory: statsRow('Est. peak memory', 'stat-memory', true),
  };
  const progress = h('progress', { max: '1', value: '0', 'data-testid': 'progress', 'aria-label': 'Training progress' });
  const progressLeft = h('span', { 'data-testid': 'progress-label' }, DASH);
  const progressRight = h('span', {}, '');
  const statsCard = h('section', { class: 'card', 'aria-label': 'Progress' },
    h('h2', {}, 'Progress'), progress, h('div', { class: 'progresslabel' }, progressLeft, progressRight),
    h('dl', { class: 'stats' }, Object.values(rows).map((r) => r.nodes)));
  const results = resultsCard();
  const playground = playgroundCard(id);
  let savedCheckpoints = [];
  const checkpoints = checkpointsCard(id, (data) => { savedCheckpoints = data; playground.update(st.job, data); });
  const hpList = h('dl', { class: 'hp', 'data-testid': 'job-hyperparameters' });
  const hpCard = h('section', { class: 'card', 'aria-label': 'Settings' }, h('details', {}, h('summary', {}, 'Settings'), hpList));
  const logList = h('ol', { class: 'eventlog', 'data-testid': 'event-log' });
  const logCard = h('section', { class: 'card area-log', 'aria-label': 'Event log' }, h('h2', {}, 'Events'),
    h('div', { role: 'log', 'aria-label': 'Event log' }, logList));
  root.append(errorBanner, h('div', { class: 'jobgrid' },
    chart.card, h('div', { class: 'side area-side' }, statsCard, results.card, checkpoints.card, hpCard), logCard,
    playground.card));

  // --- status: the stream's terminal status wins over a job object fetched a moment earlier

  function shownStatus() {
    const js = st.job?.status; const ss = st.streamStatus;
    if (ss && TERMINAL.has(ss)) return ss;
    if (js && TERMINAL.has(js)) return js;
    return ss || js || null;
  }
  function renderStatus() {
    const s = shownStatus();
    if (!s) return;
    if (statusSlot.dataset.status !== s) {
      statusSlot.dataset.status = s;
      statusSlot.replaceChildren(badge(s));
    }
    cancelBtn.hidden = TERMINAL.has(s);
    updateTitle();
    if (s === 'succeeded' && progress.max > 0 && !series.latest) progress.value = progress.max;
    if (TERMINAL.has(s)) { chart.finished(); loadResults(); }
  }
  function updateTitle() {
    const s = shownStatus();
    const m = series.latest;
    const prog = m && m.total_steps ? ` ${m.step}/${m.total_steps}` : '';
    document.title = `${s ? `${s}${s === 'running' ? prog : ''} · ` : ''}${id} · sftd`;
  }
  function setStreamState(state) {
    streamState.textContent = STREAM_TEXT[state];
    streamState.dataset.state = state;
    streamState.classList.toggle('warn', state === 'reconnecting' || state === 'disconnected');
  }

  // --- progress stats

  function updateStats(cols) {
    streamState.dataset.seq = String(series.lastSeq ?? '');
    streamState.dataset.duplicates = String(series.duplicates);
    const m = series.latest;
    if (!m) return;
    const total = m.total_steps;
    if (total) {
      progress.max = total; progress.value = Math.min(m.step, total);
      progressLeft.textContent = `step ${m.step} / ${total}`;
      progressRight.textContent = fmtPct((100 * m.step) / total);
    }
    rows.step.dd.textContent = total ? `${m.step} / ${total}` : String(m.step);
    const nEpochs = st.job?.hyperparameters?.n_epochs;
    rows.epoch.dd.textContent = m.epoch === null ? DASH : `${fmtNum(m.epoch, 3)}${typeof nEpochs === 'number' ? ` / ${nEpochs}` : ''}`;
    rows.loss.dd.textContent = fmtNum(m.train_loss);
    const sm = cols[2].filter((v) => v !== null);
    rows.smooth.dd.textContent = sm.length ? fmtNum(sm[sm.length - 1]) : DASH;
    const ev = series.latestEval;
    rows.eval.dd.textContent = ev ? `${fmtNum(ev.valid_loss)} @ ${ev.step}` : DASH;
    rows.acc.dd.textContent = m.train_mean_token_accuracy === null ? DASH : fmtPct(100 * m.train_mean_token_accuracy);
    const te = series.latestToolEval;
    rows.toolName.show(te !== null);
    rows.toolName.dd.textContent = te?.tool_name_accuracy == null ? DASH : `${fmtPct(100 * te.tool_name_accuracy)} @ ${te.step}`;
    rows.lr.dd.textContent = fmtLR(m.learning_rate);
    rows.tps.dd.textContent = fmtRate(m.tokens_per_second);
    rows.tokens.dd.textContent = fmtCount(m.num_tokens);
    rows.elapsed.dd.textContent = fmtDuration(m.elapsed_seconds);
    rows.eta.dd.textContent = TERMINAL.has(shownStatus()) ? DASH : fmtDuration(m.eta_seconds);
    // Mixed precision: the dynamic loss scale and the steps it skipped on overflow (null/0 in f32).
    rows.lossScale.show(m.loss_scale !== null);
    rows.lossScale.dd.textContent = Number.isInteger(m.loss_scale) ? String(m.loss_scale) : fmtNum(m.loss_scale);
    rows.skipped.show(m.loss_scale !== null || m.skipped_steps > 0);
    rows.skipped.dd.textContent = m.skipped_steps === null ? DASH : String(m.skipped_steps);
  }

  // --- event log

  function addLog(ev) {
    const t = toDate(ev.createdAt) || new Date();
    const p = (x) => String(x).padStart(2, '0');
    const d = ev.data || {};
    let text = ev.message || '';
    if (ev.kind === 'status') text = `status → ${ev.status}${ev.message ? ` — ${ev.message}` : ''}`;
    else if (ev.kind === 'checkpoint' && !text) text = `checkpoint at step ${d.step ?? '?'}`;
    else if (ev.kind === 'eval' && !text) text = `eval loss ${fmtNum(d.valid_loss)} at step ${d.step ?? '?'}`;
    const level = ev.kind === 'status' && ev.status === 'failed' ? 'error' : ev.level;
    const li = h('li', { class: `l-${level} k-${ev.kind}`, 'data-kind': ev.kind, 'data-level': level },
      h('span', { class: 't' }, `${p(t.getHours())}:${p(t.getMinutes())}:${p(t.getSeconds())}`), h('span', {}, text || ev.kind));
    const atBottom = logList.scrollHeight - logList.scrollTop - logList.clientHeight < 30;
    logList.append(li);
    while (logList.childElementCount > MAX_LOG) logList.firstElementChild.remove();
    if (atBottom) logList.scrollTop = logList.scrollHeight;
  }

  // --- the stream's events, by kind (vocabulary.js EVENT_DATA)

  const HANDLERS = {
    metrics: (ev) => { if (series.addMetrics(ev.data)) chart.scheduleDraw(); },
    eval: (ev) => { if (series.addEval(ev.data)) chart.scheduleDraw(); addLog(ev); },
    tool_eval: (ev) => { if (series.addToolEval(ev.data)) chart.scheduleDraw(); addLog(ev); },
    checkpoint: (ev) => { addLog(ev); checkpoints.refresh(); },
    log: (ev) => { addLog(ev); },
    status: (ev) => {
      st.streamStatus = ev.status ?? st.streamStatus;
      addLog(ev);
      renderStatus();
      if (ev.status && TERMINAL.has(ev.status)) {
        stream.finish();
        chart.scheduleDraw();
        refreshJob();
        checkpoints.refresh(true); // the final adapter's checkpoint is recorded with the last status
      }
    },
  };

  // --- the job object

  function renderJob(job) {
    st.job = job;
    playground.update(job, savedCheckpoints);
    modelLine.textContent = job.fine_tuned_model ? `${job.model} → ${job.fine_tuned_model}` : (job.model || '');
    const mem = job.estimated_peak_memory_bytes;
    rows.memory.show(typeof mem === 'number');
    rows.memory.dd.textContent = fmtBytes(mem);
    const flat = [];
    const walk = (o, pre) => {
      for (const [k, v] of Object.entries(o || {})) {
        if (v && typeof v === 'object' && !Array.isArray(v)) walk(v, `${pre}${k}.`);
        else flat.push([`${pre}${k}`, Array.isArray(v) ? v.join(', ') : String(v)]);
      }
    };
    walk(job.hyperparameters, '');
    for (const k of ['training_file', 'validation_file', 'seed', 'created_at', 'finished_at', 'trained_tokens']) {
      if (job[k] !== undefined && job[k] !== null) flat.push([k, k.endsWith('_at') ? fmtTime(job[k]) : String(job[k])]);
    }
    hpList.replaceChildren(...flat.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
    if (job.error?.message) {
      errorBanner.textContent = `Job failed: ${job.error.message}${job.error.param ? ` (${job.error.param})` : ''}`;
    }
    renderStatus();
  }

  async function refreshJob() {
    try {
      const job = await api(jobPath(id));
      if (!st.alive) return null;
      renderJob(job);
      return job;
    } catch (e) {
      if (!st.alive) return null;
      if (e.status === 404) { errorBanner.textContent = `No job ${id} on this server.`; st.missing = true; stream?.stop(); }
      else if (e.status !== 401) errorBanner.textContent = `Could not load the job: ${e.message}`;
      return null;
    }
  }

  function loadResults() {
    const files = Array.isArray(st.job?.result_files) ? st.job.result_files : [];
    if (results.show(files)) return;
    // The terminal event can land a moment before the job lists its files: look again a few
    // times (one timer at a time).
    if (shownStatus() === 'succeeded' && st.alive && !st.resultsTimer && st.resultsTries < 8) {
      st.resultsTries++;
      st.resultsTimer = setTimeout(async () => {
        if (st.alive) await refreshJob();
        st.resultsTimer = null;
        if (st.alive) loadResults();
      }, 750);
    }
  }

  // --- start
  let stream = null;
  refreshJob().then(() => {
    if (!st.alive || st.missing) return;
    stream = followEvents(id, series, {
      onEvent: (ev) => (HANDLERS[ev.kind] || HANDLERS.log)(ev),
      onState: setStreamState,
      checkJob: refreshJob,
    });
    const poll = async () => {
      if (!st.alive) return;
      if (!TERMINAL.has(shownStatus())) await refreshJob();
      st.pollTimer = setTimeout(poll, 5000);
    };
    st.pollTimer = setTimeout(poll, 5000);
  });

  return () => {
    st.alive = false;
    stream?.destroy();
    clearTimeout(st.pollTimer);
    clearTimeout(st.resultsTimer);
    checkpoints.destroy();
    playground.destroy();
    chart.destroy();
  };
}
