// Reading a streamed chat completion: the `data:` messages of an SSE body, and the chunks
// (`chat.completion.chunk`) folded into one answer (content, tool calls, finish reason, usage).

/** Splits SSE text into complete `data` payloads; returns [payloads, the unfinished rest]. */
export function sseData(buffer) {
  const out = [];
  let rest = buffer.replace(/\r\n/g, '\n');
  for (let i = rest.indexOf('\n\n'); i >= 0; i = rest.indexOf('\n\n')) {
    const block = rest.slice(0, i);
    rest = rest.slice(i + 2);
    const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, ''));
    if (data.length) out.push(data.join('\n'));
  }
  return [out, rest];
}

/** An empty answer, to fold chunks into with `foldChunk`. */
export const emptyAnswer = () => ({ content: '', toolCalls: [], finish: null, usage: null, error: null, done: false });

/** Folds one `data` payload (a chunk JSON, an error object, or `[DONE]`) into `a`. */
export function foldChunk(a, data) {
  if (data === '[DONE]') { a.done = true; return a; }
  let c;
  try { c = JSON.parse(data); } catch { a.error = `unreadable chunk: ${data.slice(0, 80)}`; return a; }
  if (c.error) { a.error = c.error.message || 'the server reported an error'; return a; }
  if (c.usage) a.usage = c.usage;
  for (const choice of c.choices || []) {
    const d = choice.delta || {};
    if (typeof d.content === 'string') a.content += d.content;
    for (const tc of d.tool_calls || []) {
      const i = tc.index ?? a.toolCalls.length;
      const slot = a.toolCalls[i] || (a.toolCalls[i] = { id: '', name: '', arguments: '' });
      if (tc.id) slot.id = tc.id;
      if (tc.function?.name) slot.name += tc.function.name;
      if (tc.function?.arguments) slot.arguments += tc.function.arguments;
    }
    if (choice.finish_reason) a.finish = choice.finish_reason;
  }
  return a;
}

/** A tool call as people read it: `name({ pretty JSON arguments })`, raw text if not JSON. */
export function formatToolCall(call) {
  let args = call.arguments;
  try { args = JSON.stringify(JSON.parse(call.arguments), null, 2); } catch { /* shown as sent */ }
  return `${call.name}(${args})`;
}
