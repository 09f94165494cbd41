// llama.cpp (node-llama-cpp's prebuilt CPU binaries) on a GGUF file: for each prompt of a JSON list, its token ids
// (special tokens parsed) and the greedy completion of those ids. Usage: node complete.mjs FILE.gguf PROMPTS.json N
import {getLlama, LlamaCompletion} from "node-llama-cpp";
import fs from "fs";

const [modelPath, promptsFile, newTokens] = process.argv.slice(2);
const prompts = JSON.parse(fs.readFileSync(promptsFile, "utf8"));
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const results = [];
for (const text of prompts) {
  const context = await model.createContext({contextSize: 1024, threads: 2});
  const completion = new LlamaCompletion({contextSequence: context.getSequence()});
  const tokens = Array.from(model.tokenize(text, true));
  const answer = await completion.generateCompletion(tokens, {maxTokens: Number(newTokens), temperature: 0});
  results.push({tokens, answer});
  await context.dispose();
}
console.log(JSON.stringify(results));
process.exit(0);  // the native threads would otherwise keep the process alive
