// The job page's Playground: chat with the job's fine-tuned model or any of its checkpoints
// (also while it trains), the answer streamed from /v1/chat/completions; example prompts with
// their tool schemas from the job's data as presets; tool calls shown as calls; the answer as text
// or as a JSON object (`response_format`); optionally side by side with the base model.
import { api, authHeaders, jobPath, listData } from './api.js';
import { emptyAnswer, foldChunk, formatToolCall, sseData } from './chatstream.js';
import { h } from './dom.js';

export function playgroundCard(jobId) {
  const st = { job: null, presets: [], tools: [], aborts: [], alive: true, picked: false };
  const model = h('select', { 'data-testid': 'play-model', 'aria-label': 'Model' });
  const preset = h('select', { 'data-testid': 'play-preset', 'aria-label': 'Example prompt' },
    h('option', { value: '' }, 'Example prompts from the job’s data…'));
  const system = h('textarea', { rows: 2, 'data-testid': 'play-system', 'aria-label': 'System message', placeholder: 'System message (optional)' });
  const user = h('textarea', { rows: 3, 'data-testid': 'play-user', 'aria-label': 'Your message', placeholder: 'Your message' });
  // tool_choice: 'auto', 'none', 'required', or 'call:NAME' for one named function.
  const toolChoice = h('select', { 'data-testid': 'play-tool-choice', 'aria-label': 'Tool choice' });
  const toolNames = h('span', { class: 'muted mono', 'data-testid': 'play-tools' });
  const toolsRow = h('label', { class: 'row', hidden: true }, 'Tools', toolChoice, toolNames);
  // response_format: 'text' (the default) or 'json_object'.
  const format = h('select', { 'data-testid': 'play-format', 'aria-label': 'Answer format' },
    h('option', { value: 'text' }, 'text'),
    h('option', { value: 'json_object' }, 'a JSON object'));
  const compare = h('input', { type: 'checkbox', 'data-testid': 'play-compare' });
  const temperature = h('input', { type: 'number', min: '0', max: '2', step: '0.1', value: '0', 'data-testid': 'play-temperature', 'aria-label': 'Temperature', class: 'narrow' });
  const maxTokens = h('input', { type: 'number', min: '1', step: '1', value: '128', 'data-testid': 'play-max-tokens', 'aria-label': 'Max tokens', class: 'narrow' });
  const send = h('button', { type: 'submit', class: 'primary', 'data-testid': 'play-send' }, 'Send');
  const stop = h('button', { type: 'button', 'data-testid': 'play-stop', hidden: true }, 'Stop');
  const note = h('p', { class: 'muted', 'data-testid': 'play-note' }, 'The playground opens once the job has saved a checkpoint.');
  const answers = h('div', { class: 'playanswers', 'data-testid': 'play-answers' });
  const form = h('form', { class: 'playform', hidden: true },
    h('div', { class: 'row' }, model, preset),
    system, user, toolsRow,
    h('div', { class: 'row' },
      h('label', { class: 'row' }, 'Temperature', temperature),
      h('label', { class: 'row' }, 'Max tokens', maxTokens),
      h('label', { class: 'row' }, 'Answer', format),
      h('label', { class: 'row' }, compare, 'Side by side with the base model'),
      h('span', { class: 'spacer' }), stop, send));
  const card = h('section', { class: 'card area-play', 'aria-label': 'Playground', 'data-testid': 'playground' },
    h('h2', {}, 'Playground'), note, form, answers);

  // A model the user chose stays chosen as the list grows; otherwise the first (the final
  // model once there is one) is the default.
  model.addEventListener('change', () => { st.picked = true; });
  preset.addEventListener('change', () => {
    const p = st.presets.find((x) => x.id === preset.value);
    if (!p) return;
    const sys = p.messages.filter((m) => m.role === 'system').map((m) => m.content).join('\n');
    const last = [...p.messages].reverse().find((m) => m.role === 'user');
    system.value = sys;
    user.value = last?.content ?? '';
    setTools(p.tools);
  });

  // A JSON answer and a forced call cannot both begin the answer (the API refuses the pair), so
  // while the answer is JSON the tool choices that force a call are off.
  function syncFormat() {
    const json = format.value === 'json_object';
    for (const o of toolChoice.options) o.disabled = json && (o.value === 'required' || o.value.startsWith('call:'));
    if (toolChoice.selectedOptions[0]?.disabled) toolChoice.value = 'auto';
  }
  format.addEventListener('change', syncFormat);

  function setTools(tools) {
    st.tools = Array.isArray(tools) ? tools : [];
    toolsRow.hidden = st.tools.length === 0;
    const names = st.tools.map((t) => t.function?.name).filter(Boolean);
    toolNames.textContent = names.join(', ');
    toolChoice.replaceChildren(
      h('option', { value: 'auto' }, 'offered, the model decides'),
      h('option', { value: 'none' }, 'not offered'),
      h('option', { value: 'required' }, 'a call is required'),
      ...names.map((n) => h('option', { value: `call:${n}` }, `call ${n}`)));
    syncFormat();
  }

  /** The request's `tools` and `tool_choice` for the chosen option. */
  function toolFields() {
    const choice = toolChoice.value || 'auto';
    if (!st.tools.length || choice === 'none') return {};
    if (choice === 'auto') return { tools: st.tools };
    if (choice === 'required') return { tools: st.tools, tool_choice: 'required' };
    return { tools: st.tools, tool_choice: { type: 'function', function: { name: choice.slice('call:'.length) } } };
  }

  function messages() {
    const out = [];
    if (system.value.trim()) out.push({ role: 'system', content: system.value });
    out.push({ role: 'user', content: user.value });
    return out;
  }

  /** One column: streams `modelId`'s answer into it. */
  async function answer(modelId, label, column) {
    const content = h('div', { class: 'playcontent', 'data-testid': 'play-content' });
    const calls = h('div', { 'data-testid': 'play-tool-calls' });
    const finish = h('div', { class: 'muted playfinish', 'data-testid': 'play-finish' }, 'waiting for the device…');
    column.replaceChildren(h('h3', { class: 'mono' }, label), content, calls, finish);
    column.dataset.state = 'streaming';
    const abort = new AbortController();
    st.aborts.push(abort);
    const body = {
      model: modelId, messages: messages(), stream: true, stream_options: { include_usage: true },
      temperature: Number(temperature.value), max_completion_tokens: Number(maxTokens.value),
      ...toolFields(),
      ...(format.value === 'json_object' ? { response_format: { type: 'json_object' } } : {}),
    };
    const a = emptyAnswer();
    try {
      const res = await fetch('v1/chat/completions', {
        method: 'POST', signal: abort.signal,
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream', ...authHeaders() },
        body: JSON.stringify(body),
      });
      if (!res.ok) {
        const err = await res.json().catch(() => null);
        throw new Error(err?.error?.message || `HTTP ${res.status}`);
      }
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const [payloads, rest] = sseData(buffer + value);
        buffer = rest;
        for (const p of payloads) foldChunk(a, p);
        content.textContent = a.content;
        if (a.content) finish.textContent = 'streaming…';
      }
      if (a.error) throw new Error(a.error);
      calls.replaceChildren(...a.toolCalls.map((c) => h('pre', { class: 'toolcall', 'data-testid': 'play-tool-call', 'data-name': c.name }, formatToolCall(c))));
      const u = a.usage ? ` · ${a.usage.prompt_tokens} prompt + ${a.usage.completion_tokens} completion tokens` : '';
      finish.textContent = `finish: ${a.finish ?? 'none'}${u}`;
      column.dataset.state = 'done';
      column.dataset.finish = a.finish ?? '';
    } catch (e) {
      finish.textContent = abort.signal.aborted ? 'stopped' : `error: ${e.message}`;
      column.dataset.state = abort.signal.aborted ? 'stopped' : 'error';
    }
  }

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    if (!model.value || !user.value.trim()) return;
    send.disabled = true; stop.hidden = false;
    const runs = [[model.value, model.value]];
    if (compare.checked && st.job?.model) runs.push([st.job.model, `${st.job.model} (base)`]);
    const cols = runs.map(([id]) => h('div', { class: 'playanswer', 'data-testid': 'play-answer', 'data-model': id }));
    answers.classList.toggle('two', cols.length > 1);
    answers.replaceChildren(...cols);
    await Promise.all(runs.map(([id, label], i) => answer(id, label, cols[i])));
    st.aborts = [];
    send.disabled = false; stop.hidden = true;
  });
  stop.addEventListener('click', () => { for (const a of st.aborts) a.abort(); });

  async function loadPresets() {
    try {
      st.presets = listData(await api(`${jobPath(jobId)}/chat_presets`));
    } catch { st.presets = []; }
    if (!st.alive) return;
    preset.replaceChildren(preset.firstElementChild, ...st.presets.map((p) => {
      const names = p.tools.map((t) => t.function?.name).filter(Boolean).join(', ') || 'no tools';
      const last = [...p.messages].reverse().find((m) => m.role === 'user')?.content ?? '';
      return h('option', { value: p.id }, `${names} — ${String(last).slice(0, 60)}`);
    }));
  }
  loadPresets();

  return {
    card,
    /** The job's models: its fine-tuned model once it succeeded, and every checkpoint. */
    update(job, checkpoints) {
      st.job = job;
      const ids = [];
      if (job?.fine_tuned_model) ids.push(job.fine_tuned_model);
      for (const c of checkpoints) if (c.fine_tuned_model_checkpoint) ids.push(c.fine_tuned_model_checkpoint);
      const have = [...model.options].map((o) => o.value);
      if (ids.join('\n') !== have.join('\n')) {
        const keep = model.value;
        model.replaceChildren(...ids.map((id) => h('option', { value: id }, id.includes(':ckpt-step-') ? `checkpoint step ${id.split(':ckpt-step-')[1]}` : `${id} (final)`)));
        if (st.picked && ids.includes(keep)) model.value = keep;
      }
      form.hidden = ids.length === 0;
      note.hidden = ids.length > 0;
    },
    destroy() { st.alive = false; for (const a of st.aborts) a.abort(); },
  };
}
