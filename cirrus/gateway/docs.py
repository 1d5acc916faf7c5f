"""A self-contained docs page per API (no CDN: it must work offline)."""

from __future__ import annotations

import html

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{name} - Cirrus API</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}
pre,textarea{{background:#f5f5f5;padding:.75rem;border-radius:6px;font-size:.9rem;width:100%;box-sizing:border-box}}
button{{padding:.4rem 1rem}} code{{background:#f0f0f0;padding:0 .2rem}}
</style></head>
<body>
<h1>{name}</h1>
<p><code>POST /{name}</code> &middot; schema: <a href="/{name}/openapi.json">openapi.json</a></p>
<h2>Request schema</h2><pre id="req">loading...</pre>
<h2>Response schema</h2><pre id="res">loading...</pre>
<h2>Try it</h2>
<textarea id="body" rows="6">{{}}</textarea><br><button id="send">POST /{name}</button>
<pre id="out"></pre>
<script>
const api = {name_json};
fetch(`/${{api}}/openapi.json`).then(r => r.json()).then(doc => {{
  const op = doc.paths[`/${{api}}`].post;
  const show = s => JSON.stringify({{schema: s, components: doc.components.schemas}}, null, 2);
  document.getElementById('req').textContent = show(op.requestBody.content['application/json'].schema);
  document.getElementById('res').textContent = show(op.responses['200'].content['application/json'].schema);
}});
document.getElementById('send').onclick = async () => {{
  const r = await fetch(`/${{api}}`, {{method: 'POST', headers: {{'content-type': 'application/json'}},
    body: document.getElementById('body').value}});
  document.getElementById('out').textContent = r.status + '\\n' + await r.text();
}};
</script></body></html>
"""


def docs_page(name: str) -> str:
    import json

    return _PAGE.format(name=html.escape(name), name_json=json.dumps(name))
