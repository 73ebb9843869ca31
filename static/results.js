// The job page's Results (download links for the result files) and Checkpoints (step, train and
// eval loss of each saved adapter: which one to keep) cards.
import { api, apiKey, downloadWithKey, jobPath, listData } from './api.js';
import { h } from './dom.js';
import { fmtBytes, fmtNum, DASH } from './format.js';

export function resultsCard() {
  const list = h('ul', { class: 'files', 'data-testid': 'result-files' });
  const card = h('section', { class: 'card', 'aria-label': 'Results', hidden: true }, h('h2', {}, 'Results'), list);
  let shownFor = null;
  return {
    card,
    /** Show `fileIds` (a job's result_files) once; true when there are any. */
    show(fileIds) {
      const key = fileIds.join(',');
      if (!fileIds.length || shownFor === key) return fileIds.length > 0;
      shownFor = key;
      card.hidden = false;
      list.replaceChildren(...fileIds.map((fileId) => {
        const href = `v1/files/${encodeURIComponent(fileId)}/content`;
        const a = h('a', { href, 'data-testid': 'result-file', 'data-file-id': fileId, download: '' }, fileId);
        const meta = h('span', { class: 'muted' });
        a.addEventListener('click', (e) => {
          if (!apiKey()) return; // a plain link works when the server has no key
          e.preventDefault();
          downloadWithKey(href, a.getAttribute('download') || fileId);
        });
        api(`v1/files/${encodeURIComponent(fileId)}`).then((f) => {
          if (f?.filename) { a.textContent = f.filename; a.setAttribute('download', f.filename); a.dataset.filename = f.filename; }
          if (f?.bytes !== undefined) meta.textContent = ` ${fmtBytes(f.bytes)}`;
        }).catch(() => {});
        return h('li', {}, a, meta);
      }));
      return true;
    },
  };
}

/** `onLoad(checkpoints)` gets every list it loads (the playground offers them as models). */
export function checkpointsCard(jobId, onLoad = () => {}) {
  const body = h('tbody');
  const card = h('section', { class: 'card', 'aria-label': 'Checkpoints', hidden: true },
    h('h2', {}, 'Checkpoints'),
    h('table', { class: 'ckpts', 'data-testid': 'checkpoints' },
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Step'), h('th', { scope: 'col' }, 'Train loss'), h('th', { scope: 'col' }, 'Eval loss'))),
      body));
  let timer = null;
  let alive = true;
  async function load() {
    timer = null;
    try {
      const data = listData(await api(`${jobPath(jobId)}/checkpoints?limit=100`))
        .sort((a, b) => (b.step_number ?? 0) - (a.step_number ?? 0));
      if (!alive) return;
      onLoad(data);
      card.hidden = data.length === 0;
      body.replaceChildren(...data.map((c) => h('tr', { 'data-step': c.step_number ?? '' },
        h('td', {}, c.step_number ?? DASH), h('td', {}, fmtNum(c.metrics?.train_loss)),
        h('td', {}, fmtNum(c.metrics?.valid_loss)))));
    } catch { /* keep what is shown */ }
  }
  load();
  return {
    card,
    /** Reload soon (a checkpoint event arrived); `restart` counts the delay from now (the run ended). */
    refresh(restart = false) {
      if (restart) { clearTimeout(timer); timer = null; }
      if (!timer) timer = setTimeout(load, 1500);
    },
    destroy() { alive = false; clearTimeout(timer); },
  };
}
