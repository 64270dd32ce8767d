// Parses every ```mermaid block of the Markdown files given with mermaid's own parser, as GitHub
// does before it draws one; exits 1 on the first file with a block that does not parse.
// .ci/run installs mermaid and jsdom (mermaid's sanitizer needs a DOM, even to parse) next to it.
import { readFileSync } from "node:fs";
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!DOCTYPE html><body></body>");
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const { default: mermaid } = await import("mermaid");
mermaid.initialize({ startOnLoad: false });

let failed = 0;
for (const file of process.argv.slice(2)) {
  const blocks = [...readFileSync(file, "utf8").matchAll(/^```mermaid\n([\s\S]*?)^```$/gm)];
  for (const [number, [, text]] of blocks.entries()) {
    try {
      await mermaid.parse(text);
      // A gantt chart's dates are only read when it is drawn: read them here too.
      const diagram = await mermaid.mermaidAPI.getDiagramFromText(text);
      diagram.db.getTasks?.();
    } catch (error) {
      failed++;
      console.error(`${file}: mermaid block ${number + 1} does not parse:\n${error.message ?? error}`);
    }
  }
  console.log(`${file}: ${blocks.length} mermaid blocks`);
}
process.exit(failed ? 1 : 0);
