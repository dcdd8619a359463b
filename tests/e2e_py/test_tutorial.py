"""The tutorial's Python example (/work/shared/seed, section 4.1.2), translated to our host and key, against the stack
that `npm test` started. The function body is the tutorial's; the host, the Authorization header and max_length (300 →
16: the CPU test machine generates a few tokens per second) are ours."""

from __future__ import annotations

import os

import requests

BASE_URL = os.environ.get("STACK_BASE_URL")
API_KEY = os.environ.get("STACK_API_KEY", "")

if not BASE_URL:  # never skip silently: these tests are only meaningful against the running stack
    raise RuntimeError("STACK_BASE_URL is not set: run the end-to-end tests through `npm test`, which starts the stack")


def tutorial_test_api():
    """Section 4.1.2 of the tutorial, with `url` and `headers` translated; returns the result for the assertions."""
    url = f"{BASE_URL}/chat"
    headers = {"Authorization": f"Bearer {API_KEY}"}

    # 准备请求数据
    data = {
        "prompt": "写一个关于人工智能的短故事",
        "max_length": 16,
        "temperature": 0.8,
    }

    # 发送请求
    response = requests.post(url, json=data, headers=headers, timeout=170)

    # 处理响应
    if response.status_code == 200:
        result = response.json()
        print(f"响应内容: {result['response']}")
        print(f"使用token数: {result['tokens_used']}")
        print(f"处理时间: {result['processing_time']:.3f}秒")
    else:
        print(f"请求失败: {response.status_code}")
        print(response.text)
    return response


def test_tutorial_python_example():
    response = tutorial_test_api()
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == {"response", "history", "tokens_used", "processing_time"}
    assert isinstance(result["response"], str) and result["response"]
    assert result["history"] == [["写一个关于人工智能的短故事", result["response"]]]
    assert isinstance(result["tokens_used"], int) and result["tokens_used"] > 10
    assert isinstance(result["processing_time"], float) and result["processing_time"] > 0
    # The tutorial's 10/minute limit is announced on every response of these routes.
    assert response.headers["x-ratelimit-limit-requests"] == "10"


def test_tutorial_health_example():
    response = requests.get(f"{BASE_URL}/health", timeout=60)
    assert response.status_code == 200
    assert response.json()["status"] == "healthy"
    assert response.json()["service"] == "llm-api"
