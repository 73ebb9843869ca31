// The jobs list (#/): every job with its status, progress, latest loss and throughput, refreshed
// every 2 s. Progress is read from each job's event log (incrementally, `?after=`) while it runs,
// and from its last checkpoint once it has finished.
import { api, jobPath, listData } from './api.js';
import { h, badge, twoStep } from './dom.js';
import { fmtNum, fmtRate, fmtDuration, fmtTime, fmtPct, toDate, DASH } from './format.js';
import { TERMINAL, classify, numbers } from './vocabulary.js';

const SUMMARY_FIELDS = ['step', 'total_steps', 'train_loss', 'tokens_per_second'];
/** job id → {step, total_steps, train_loss, tokens_per_second, after, done}; kept across visits. */
const summaries = new Map();

/** Bring a job's summary up to date; true when it may have changed. */
async function summarize(job) {
  let sm = summaries.get(job.id);
  if (!sm) { sm = { after: null, done: false }; summaries.set(job.id, sm); }
  if (sm.done || sm.busy) return false;
  sm.busy = true;
  try {
    const terminal = TERMINAL.has(job.status);
    if (job.status === 'running' || (terminal && sm.after !== null)) {
      // While it runs, and once more after it ends (the last steps since the previous look).
      sm.done = terminal;
      for (let page = 0; page < 20; page++) {
        const q = new URLSearchParams({ limit: '500' });
        if (sm.after !== null) q.set('after', String(sm.after));
        const list = await api(`${jobPath(job.id)}/events?${q}`);
        const data = listData(list);
        for (const e of data) {
          const ev = classify(e);
          if (ev.seq !== null) sm.after = ev.seq;
          if (ev.kind !== 'metrics') continue;
          for (const [k, v] of Object.entries(numbers(ev.data, SUMMARY_FIELDS))) if (v !== null) sm[k] = v;
        }
        if (!list?.has_more || !data.length) break;
      }
      return true;
    }
    if (!terminal) return false;
    sm.done = true;
    const c = listData(await api(`${jobPath(job.id)}/checkpoints?limit=1`))[0];
    if (!c) return false;
    sm.step = c.step_number;
    sm.train_loss = c.metrics?.train_loss ?? null;
    if (job.status === 'succeeded') sm.total_steps = sm.step;
    return true;
  } catch {
    return false;
  } finally {
    sm.busy = false;
  }
}

const COLUMNS = [['Job'], ['Status'], ['Model', 'hide-narrow'], ['Progress'], ['Loss', 'num'],
  ['Throughput', 'num hide-narrow'], ['Created', 'hide-narrow'], ['Finished', 'hide-narrow'], ['', '']];

function setCell(td, key, build) {
  if (td.dataset.sig === key) return;
  td.dataset.sig = key;
  td.replaceChildren(...[].concat(build()));
}

function updateRow(r, job) {
  const sm = summaries.get(job.id) || {};
  const step = sm.step ?? null; const total = sm.total_steps ?? null;
  const loss = sm.train_loss ?? null; const tps = sm.tokens_per_second ?? null;
  const status = job.status || 'unknown';
  r.tr.dataset.status = status;
  setCell(r.tds[0], job.id, () => h('a', { href: `#/jobs/${encodeURIComponent(job.id)}`, class: 'mono', 'data-testid': 'job-link' }, job.id));
  setCell(r.tds[1], status, () => badge(status));
  setCell(r.tds[2], String(job.model), () => h('span', { class: 'mono' }, job.model ?? DASH));
  const pct = step !== null && total ? Math.min(100, (100 * step) / total) : (status === 'succeeded' ? 100 : null);
  const eta = toDate(job.estimated_finish);
  const etaText = status === 'running' && eta ? `ETA ${fmtDuration((eta.getTime() - Date.now()) / 1000)}` : null;
  setCell(r.tds[3], `${step}/${total}/${status}/${etaText}`, () => (pct === null ? (etaText || DASH) : [
    h('span', { class: 'minibar', role: 'img', 'aria-label': `${fmtPct(pct)} done` }, h('span', { style: `width:${pct}%` })),
    step !== null && total ? `${step} / ${total}` : fmtPct(pct)]));
  setCell(r.tds[4], String(loss), () => fmtNum(loss));
  setCell(r.tds[5], String(tps), () => (tps === null ? DASH : fmtRate(tps)));
  setCell(r.tds[6], String(job.created_at), () => h('time', { datetime: toDate(job.created_at)?.toISOString() }, fmtTime(job.created_at)));
  setCell(r.tds[7], String(job.finished_at), () => fmtTime(job.finished_at));
  r.cancel.hidden = TERMINAL.has(status);
}

export function jobsView(root) {
  let alive = true; let timer = null; let limit = 50; let inflight = false;
  const note = h('p', { class: 'muted', 'data-testid': 'jobs-note', 'aria-live': 'polite' });
  const tbody = h('tbody');
  const table = h('table', { class: 'jobs', 'data-testid': 'jobs-table' },
    h('caption', { class: 'visually-hidden' }, 'Fine-tuning jobs, refreshed every 2 seconds'),
    h('thead', {}, h('tr', {}, COLUMNS.map(([t, c]) => h('th', { scope: 'col', class: c || '' }, t || h('span', { class: 'visually-hidden' }, 'Actions'))))),
    tbody);
  const empty = h('div', { class: 'empty card', hidden: true, 'data-testid': 'jobs-empty' },
    h('p', {}, 'No jobs yet.'), h('a', { href: '#/new', class: 'button primary' }, 'Start a fine-tuning job'));
  const more = h('button', { type: 'button', hidden: true, 'data-testid': 'jobs-more', onclick: () => { limit += 50; refresh(); } }, 'Show more');
  root.append(
    h('div', { class: 'pagehead' }, h('h1', {}, 'Jobs'), h('span', { class: 'spacer' }),
      h('a', { href: '#/new', class: 'button primary', 'data-testid': 'new-job-link' }, 'New job')),
    h('div', { class: 'tablewrap' }, table), empty, h('div', { class: 'row' }, more), note);

  const rows = new Map();

  function makeRow(job) {
    const tds = COLUMNS.map(([, c]) => h('td', { class: c || '' }));
    const cancel = twoStep('Cancel', 'Confirm cancel', async () => {
      try {
        await api(`${jobPath(job.id)}/cancel`, { method: 'POST' });
        note.textContent = `Cancellation requested for ${job.id}.`;
      } catch (e) { note.textContent = `Cancel failed: ${e.message}`; }
      refresh();
    }, { 'data-testid': 'job-cancel', 'aria-label': `Cancel job ${job.id}` });
    tds[8].append(cancel);
    const tr = h('tr', { 'data-testid': 'job-row', 'data-job-id': job.id }, tds);
    return { tr, tds, cancel };
  }

  function render(jobs) {
    const seen = new Set();
    let prev = null;
    for (const job of jobs) {
      if (!job || !job.id) continue;
      seen.add(job.id);
      let r = rows.get(job.id);
      if (!r) { r = makeRow(job); rows.set(job.id, r); }
      updateRow(r, job);
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (want !== r.tr) tbody.insertBefore(r.tr, want);
      prev = r.tr;
    }
    for (const [id, r] of rows) if (!seen.has(id)) { r.tr.remove(); rows.delete(id); }
    empty.hidden = rows.size > 0;
    table.hidden = rows.size === 0;
  }

  async function refresh() {
    if (!alive || inflight) return;
    clearTimeout(timer);
    inflight = true;
    try {
      const list = await api(`v1/fine_tuning/jobs?limit=${limit}`);
      if (!alive) return;
      const jobs = listData(list);
      render(jobs);
      // Progress comes from each job's events (in the background; rows update when it lands).
      for (const job of jobs) {
        if (!job?.id || (job.status !== 'running' && !TERMINAL.has(job.status))) continue;
        summarize(job).then((changed) => { const r = rows.get(job.id); if (changed && r && alive) updateRow(r, job); });
      }
      more.hidden = !list?.has_more;
      if (note.dataset.err) { note.textContent = ''; delete note.dataset.err; }
    } catch (e) {
      if (!alive) return;
      note.textContent = `Could not load jobs: ${e.message}`;
      note.dataset.err = '1';
    } finally {
      inflight = false;
      if (alive) timer = setTimeout(refresh, 2000);
    }
  }
  refresh();
  return () => { alive = false; clearTimeout(timer); };
}
