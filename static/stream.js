// Follow a job's event stream (SSE) from the page's own position: every event is classified
// through vocabulary.js, events whose seq was already processed are dropped, and a broken stream
// is reopened with `?after=<last seq>` (with backoff, checking the job in between).
import { apiKey, jobPath } from './api.js';
import { classify, TERMINAL } from './vocabulary.js';

/**
 * `series`: the RunSeries holding the stream position. `onEvent(ev)` gets each new classified
 * event; `onState(state)` gets connecting | live | reconnecting | disconnected | complete;
 * `checkJob()` resolves to the job object (or null) before a reopen.
 */
export function followEvents(id, series, { onEvent, onState, checkJob }) {
  const st = { alive: true, done: false, es: null, reopenTimer: null, backoff: 1000, emptyOpens: 0, gotSinceOpen: 0 };

  function onMessage(e) {
    if (!st.alive) return;
    let raw;
    try { raw = JSON.parse(e.data); } catch { raw = { message: String(e.data ?? '') }; }
    const ev = classify(raw, e.lastEventId);
    if (!series.acceptSeq(ev.seq)) return;
    st.gotSinceOpen++;
    onEvent(ev);
  }

  function close() {
    clearTimeout(st.reopenTimer);
    if (st.es) { st.es.close(); st.es = null; }
  }

  function open() {
    if (!st.alive || st.done) return;
    close();
    const params = new URLSearchParams({ stream: 'true' });
    if (series.lastSeq !== null) params.set('after', String(series.lastSeq));
    if (apiKey()) params.set('access_token', apiKey());
    const es = new EventSource(`${jobPath(id)}/events?${params}`);
    st.es = es;
    st.gotSinceOpen = 0;
    onState('connecting');
    es.onopen = () => { if (st.es === es) { onState('live'); st.backoff = 1000; } };
    es.onmessage = onMessage; // the server names no events: every message arrives here
    es.onerror = () => {
      if (st.es !== es) return;
      if (st.done) { close(); return; }
      st.emptyOpens = st.gotSinceOpen === 0 ? st.emptyOpens + 1 : 0;
      st.gotSinceOpen = 0;
      if (es.readyState === EventSource.CLOSED) {
        onState('disconnected');
        scheduleReopen();
      } else {
        onState('reconnecting');
        // The browser retries by itself (sending Last-Event-ID). If it keeps failing, check the job
        // (this also asks for the API key on 401) and reopen from our own position.
        if (st.emptyOpens >= 3) scheduleReopen();
      }
    };
  }

  function scheduleReopen() {
    close();
    const delay = st.backoff;
    st.backoff = Math.min(st.backoff * 2, 10000);
    st.reopenTimer = setTimeout(async () => {
      if (!st.alive || st.done) return;
      const job = await checkJob();
      if (!st.alive || st.done) return;
      if (job && TERMINAL.has(job.status) && st.emptyOpens >= 4) {
        // The stream has nothing more to give (its terminal event was never delivered).
        finish();
        return;
      }
      open();
    }, delay);
  }

  /** The job has ended: stop following (the server closes the stream after the terminal event). */
  function finish() {
    st.done = true;
    close();
    onState('complete');
  }

  open();
  return {
    finish,
    /** Stop without calling the run complete (the page is going away, or the job does not exist). */
    stop() { st.done = true; close(); },
    destroy() { st.alive = false; close(); },
  };
}
